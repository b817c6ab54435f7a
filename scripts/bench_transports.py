"""The three transports of dptrain's step, timed on the `dptrain scale` floors.

    python scripts/bench_transports.py                      # writes benchmarks/transports.json
    python scripts/bench_transports.py --rounds 1 --out /tmp/t.json

Transports (`--transport`): `auto` (shared memory and the hand-written control channel for
CPU workers on the server's node), `object_store` (Ray calls, parameters and gradients
through Ray's object store) and `compiled_graph` (a Ray Compiled Graph compiled and
executed by the server). Settings: the tiny model (moons, 2-8-2, batch 16) at 2
workers, and 784-1024-1024-10 (synthetic, batch 256) at 1 and 2 workers.

Each round runs every (setting, transport) once, in turn, each in a trainer of its own
(`dptrain.scaling.hooks.running`: the actors `fit` starts, driven in blocks with no
logging): a warm-up block, then timed blocks; the figure of a round is the median step
time (the server's own measure of a whole step, as `dptrain scale` reports it), and the
result the median over rounds. The transports
never run side by side: a compiled graph's actors poll for input, which would slow the
others down on a small machine. The final parameters of the three transports are
compared: they run the same steps, so they must be equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ray  # noqa: E402

import dptrain as dp  # noqa: E402
from dptrain.scaling.hooks import running  # noqa: E402

TRANSPORTS = ("auto", "object_store", "compiled_graph")
SETTINGS = [("tiny 2-8-2, 2 workers", "moons", [2, 8, 2], 16, 2, 200),
            ("784-1024-1024-10, 1 worker", "synthetic", [784, 1024, 1024, 10], 256, 1, 40),
            ("784-1024-1024-10, 2 workers", "synthetic", [784, 1024, 1024, 10], 256, 2, 40)]
WARMUP = 5


def timed(cfg: dp.TrainConfig, dataset, steps: int, block: int) -> tuple[float, np.ndarray]:
    """Median ms per step (the server's own time of each whole step: request, workers, update;
    an epoch end's evaluation is not in it) after a warm-up; the final parameters."""
    per_step = []
    with running(dp.Trainer(cfg, dataset=dataset)) as trainer:
        trainer.run_block(0, WARMUP)
        for first in range(WARMUP, WARMUP + steps, block):
            per_step += [1e3 * r["step_s"] for r in trainer.run_block(first, min(block, WARMUP + steps - first))]
        return statistics.median(per_step), trainer.weights()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over every setting and transport (default 3)")
    ap.add_argument("--block", type=int, default=20, help="steps per timed block (default 20)")
    ap.add_argument("--out", default="benchmarks/transports.json")
    args = ap.parse_args(argv)
    ray.init(num_cpus=max(w for *_, w, _ in SETTINGS) + 1, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    rows = []
    try:
        for name, dataset_name, model, batch, workers, steps in SETTINGS:
            dataset = dp.data.load_dataset(dataset_name)
            cfg = dp.TrainConfig(dataset=dataset_name, model=model, workers=workers, batch_size=batch,
                                 steps=WARMUP + steps, lr=0.01, momentum=0.9, seed=0, log_every=10**6)
            ms = {t: [] for t in TRANSPORTS}
            weights = {}
            for _ in range(args.rounds):
                for t in TRANSPORTS:
                    m, weights[t] = timed(cfg.replace(transport=t), dataset, steps, args.block)
                    ms[t].append(m)
            row = {"setting": name, "model": "-".join(map(str, model)), "workers": workers, "batch": batch,
                   "steps": steps, "block_steps": args.block, "rounds": args.rounds,
                   **{f"{t}_ms": statistics.median(v) for t, v in ms.items()},
                   **{f"{t}_rounds_ms": v for t, v in ms.items()},
                   "same_parameters": all(np.array_equal(weights[t], weights["auto"]) for t in TRANSPORTS)}
            rows.append(row)
            print(f"{name:<30} " + " | ".join(f"{t} {row[f'{t}_ms']:7.2f} ms" for t in TRANSPORTS)
                  + f" | same parameters: {row['same_parameters']}", flush=True)
    finally:
        ray.shutdown()
    from dptrain.scaling.bench import write_results
    write_results(args.out, {"command": "python scripts/bench_transports.py " + " ".join(argv if argv is not None
                                                                                      else sys.argv[1:]),
                             "cpus": os.cpu_count(), "ray": ray.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
