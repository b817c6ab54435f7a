"""Startup: how long from `Trainer(...).fit()` to the first step, with Ray's own start apart.

    python scripts/bench_startup.py                    # writes benchmarks/startup.json
    python scripts/bench_startup.py --runs 3 --workers 4 --out /tmp/s.json

Each run is a fresh process (a fresh embedded Ray, as a user's first command gets):
`dptrain train`'s library path with MNIST-1D, the 40-256-256-10 MLP and a few steps. The
trainer's summary reports `ray_init_s` (ray.init) and `startup_s` (everything else before
step 0: the data, the model check, starting and connecting the actors); the script adds
the fit's whole wall time. Medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ONE_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
import dptrain as dp
cfg = dp.TrainConfig(dataset="mnist1d", model=[40, 256, 256, 10], workers=int(sys.argv[1]), steps=5, log_every=10**6)
result = dp.Trainer(cfg).fit()
s = result.summary
print(json.dumps({"ray_init_s": s["ray_init_s"], "startup_s": s["startup_s"],
                  "steps_s": sum(r["time_s"] for r in result.metrics["steps"]),
                  "process_s": time.perf_counter() - t0}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[2])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/startup.json")
    args = ap.parse_args(argv)
    runs = []
    for _ in range(args.runs):
        r = subprocess.run([sys.executable, "-c", ONE_RUN, str(args.workers)], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = {"command": "python scripts/bench_startup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpus": os.cpu_count(), "workers": args.workers, "runs": runs, "median": med}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{args.workers} workers, median of {args.runs} fresh processes: ray.init {med['ray_init_s']:.2f} s | "
          f"Trainer() to step 0 beyond ray.init {med['startup_s']:.2f} s | whole process {med['process_s']:.2f} s")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
