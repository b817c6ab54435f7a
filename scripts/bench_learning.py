"""Learning benchmark: the built-in models trained as the README's commands train them.

    python scripts/bench_learning.py                           # all runs, about 2 minutes on 2 cores
    python scripts/bench_learning.py --only cnn1d --out /tmp/l.json

Each run is a `dptrain train` command (printed, and recorded with its results) on an
embedded local Ray; the results (final test accuracy and loss, wall time of training,
and the target the issue set) go to benchmarks/learning.json:
- the MNIST-1D paper's settings (Adam 0.01, batch 100, 6,000 steps, 4 workers) with its
  MLP (paper: 68%) and its CNN, ConvBase (paper: 94%; target >= 92%);
- the small CNN on the 8x8 digits as images (target >= 97%);
- the transformer on the generated sort task: the held-out loss per token against the
  best unigram model's (the entropy of the training labels) and the task's floor (the
  unpredictable first half: (length - 1) / (2 length) * log(10) nats per token).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAPER = "--dataset mnist1d --workers 4 --optimizer adam --lr 0.01 --batch-size 100 --steps 6000 --log-every 500"
RUNS = {
    "mlp": (f"{PAPER} --model 40,100,100,10", {"test_accuracy": 0.60}),
    "cnn1d": (f"{PAPER} --model cnn1d", {"test_accuracy": 0.92}),
    "cnn2d": ("--dataset digits2d --model cnn2d --workers 2 --optimizer adam --lr 0.003 --batch-size 64 "
              "--epochs 20 --log-every 100", {"test_accuracy": 0.97}),
    "transformer": ("--dataset sort --model transformer --workers 2 --optimizer adam --lr 0.003 --batch-size 64 "
                    "--epochs 8 --log-every 200", {}),
}


def sort_baselines() -> dict:
    from dptrain.data import SORT_LENGTH, SORT_VALUES, load_dataset
    y = load_dataset("sort").y_train.ravel()
    p = np.bincount(y) / len(y)
    return {"unigram_loss": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
            "floor_loss": (SORT_LENGTH - 1) / (2 * SORT_LENGTH) * math.log(SORT_VALUES)}


def run(name: str, folder: Path) -> dict:
    flags, targets = RUNS[name]
    out = folder / name
    cmd = ["dptrain", "train", *shlex.split(flags), "--no-progress", "--quiet", "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", *cmd[1:]], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{name}: dptrain train failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    res = {"command": " ".join(cmd[:-2]), "steps": summary["steps"], "workers": summary["workers"],
           "train_wall_s": summary["wall_s"], "test_accuracy": summary["test_accuracy"],
           "test_loss": summary["test_loss"], "targets": targets}
    if name == "transformer":
        res.update(sort_baselines())
    res["met"] = all(res[k] >= v for k, v in targets.items())
    line = f"{name:>12}: test accuracy {res['test_accuracy']:.4f} | test loss {res['test_loss']:.4f} | " \
           f"{res['train_wall_s']:.1f} s of training"
    if targets:
        line += f" | target {targets} {'met' if res['met'] else 'NOT met'}"
    if name == "transformer":
        line += f" | unigram {res['unigram_loss']:.3f}, floor {res['floor_loss']:.3f} nats/token"
    print(line, flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(RUNS), action="append", help="run only these (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "learning.json"), help="results file (JSON)")
    args = ap.parse_args(argv)
    from dptrain.scaling.bench import write_results
    results = {"command": "python scripts/bench_learning.py", "runs": {}}
    with tempfile.TemporaryDirectory(prefix="dptrain-learning-") as folder:
        for name in args.only or RUNS:
            results["runs"][name] = run(name, Path(folder))
    write_results(args.out, results)
    return 0 if all(r["met"] for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
