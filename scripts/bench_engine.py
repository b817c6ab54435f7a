"""Engine benchmark, as a script: the same as `dptrain bench` (see dptrain/scaling/bench.py).

    python scripts/bench_engine.py                 # full run, about a minute on 2 cores
    python scripts/bench_engine.py --quick         # fewer repeats, for a smoke test
    python scripts/bench_engine.py --out benchmarks/engine.json
"""

import os
import sys
from pathlib import Path

for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy loads BLAS: the comparison is one thread against one thread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dptrain.scaling.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
