"""The entry point a Ray job runs: `dptrain train` with the same flags.

    python scripts/train.py --dataset mnist1d --workers 4 --epochs 10        # embedded local Ray
    scripts/submit.sh -- --dataset mnist1d --workers 4 --epochs 10           # as a job on a cluster

Inside a job Ray sets RAY_ADDRESS, so the trainer joins the job's cluster; the
package comes with the uploaded working directory, so nothing needs installing
on the cluster but Ray, numpy and the dataset packages.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the uploaded working directory

from dptrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
