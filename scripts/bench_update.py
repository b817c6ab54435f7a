"""The parameter server's update against this machine's memory floor: `dptrain bench --update` as a script.

    python scripts/bench_update.py --sizes 1863690,20000000 --threads 1,2 --out benchmarks/update.json
"""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from dptrain.scaling.bench_update import main
    sys.exit(main())
