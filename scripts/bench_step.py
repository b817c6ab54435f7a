"""The fixed cost of a step, by part: `dptrain bench --step` as a script.

    python scripts/bench_step.py --steps 1000 --out benchmarks/step.json
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from dptrain.scaling.bench_step import main
    sys.exit(main())
