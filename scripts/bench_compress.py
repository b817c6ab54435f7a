"""Compressed gradients: bytes a worker sends per step, step time and learning, per setting.

    python scripts/bench_compress.py                       # writes benchmarks/compress.json
    python scripts/bench_compress.py --compress none,topk:0.001 --repeats 1 --out /tmp/c.json

For every --compress setting and transport (shared memory, where no byte crosses a
network, and the object store, where they are what moves between nodes) it trains
MNIST-1D as the README's first command does (4 workers, 30 epochs, the 40-256-256-10
MLP, SGD lr 0.1 momentum 0.9) with a 60% target recorded but not stopping the run,
--repeats times, and records the bytes each worker sent per step (measured: the
payloads' lengths), the median step time, the wall time to 60% and the final test
accuracy. Medians over repeats; the runs of a round go one after another, so each round
sees the machine's noise alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[2])
    ap.add_argument("--compress", default="none,fp16,bf16,topk:0.01")
    ap.add_argument("--transports", default="auto,object_store")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/compress.json")
    args = ap.parse_args(argv)

    import logging

    import ray

    import dptrain as dp
    from dptrain.data import load_dataset
    for name in ("dptrain.metrics", "dptrain.distributed.trainer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings, transports = args.compress.split(","), args.transports.split(",")
    dataset = load_dataset("mnist1d")
    ray.init(num_cpus=args.workers + 1, include_dashboard=False, logging_level="warning", log_to_driver=False)
    runs = []
    try:
        for repeat in range(args.repeats):
            for transport in transports:
                for setting in settings:
                    cfg = dp.TrainConfig(dataset="mnist1d", workers=args.workers, epochs=args.epochs,
                                         compress=setting, transport=transport, log_every=10**6)
                    steps, first = [], [None]

                    def sink(rec, steps=steps):
                        if rec.get("kind") == "step":
                            steps.append(rec)
                        elif rec.get("kind") == "epoch" and rec.get("test_accuracy", 0) >= 0.6 and first[0] is None:
                            first[0] = sum(r["time_s"] for r in steps)
                    s = dp.Trainer(cfg, dataset, sink=sink).fit().summary
                    runs.append({"compress": setting, "transport": transport, "repeat": repeat,
                                 "sent_bytes_per_worker_step": s["sent_bytes_per_worker_step"],
                                 "median_step_ms": s["median_step_ms"], "steps_time_to_60_s": first[0],
                                 "final_test_accuracy": s["test_accuracy"]})
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    rows = []
    for transport in transports:
        dense = None
        for setting in settings:
            group = [r for r in runs if r["compress"] == setting and r["transport"] == transport]
            times = [r["steps_time_to_60_s"] for r in group if r["steps_time_to_60_s"] is not None]
            row = {"compress": setting, "transport": transport, "repeats": len(group),
                   "sent_bytes_per_worker_step": statistics.median(r["sent_bytes_per_worker_step"] for r in group),
                   "median_step_ms": statistics.median(r["median_step_ms"] for r in group),
                   "steps_time_to_60_s": statistics.median(times) if times else None,
                   "reached_60": f"{len(times)}/{len(group)}",
                   "final_test_accuracy": statistics.median(r["final_test_accuracy"] for r in group)}
            dense = dense or (row["sent_bytes_per_worker_step"] if setting == "none" else None)
            row["bytes_cut"] = dense / row["sent_bytes_per_worker_step"] if dense else None
            rows.append(row)
            cut = "" if row["bytes_cut"] is None else f"({row['bytes_cut']:.1f}x fewer)"
            to60 = "-" if row["steps_time_to_60_s"] is None else f"{row['steps_time_to_60_s']:.2f}"
            print(f"{transport:>12} {setting:>10}: {row['sent_bytes_per_worker_step']:>9,.0f} B/worker/step {cut:>15} "
                  f"{row['median_step_ms']:6.2f} ms/step, 60% after {to60} s of steps ({row['reached_60']}), "
                  f"final {row['final_test_accuracy']:.3f}")
    command = "python scripts/bench_compress.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(args.out, "w") as f:
        json.dump({"command": command.strip(), "rows": rows, "runs": runs}, f, indent=1)
        f.write("\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
