"""nanoGPT's Shakespeare recipe beside PyTorch: `dptrain bench --recipe` as a script (same flags).

    python scripts/bench_recipe.py --torch-python VENV/bin/python --out benchmarks/recipe.json
"""

import sys

from dptrain.scaling.bench_recipe import main

if __name__ == "__main__":
    sys.exit(main())
