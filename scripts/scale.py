"""The job-submittable twin of `dptrain scale`.

    python scripts/scale.py --workers 1,2,4 --out results/scale        # embedded local Ray
    scripts/submit.sh --entry scripts/scale.py -- --workers 1,2,4,8     # as a Ray job on a cluster
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded working directory

from dptrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["scale", *sys.argv[1:]]))
