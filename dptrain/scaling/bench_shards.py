"""Sharded servers on one node against one server: `dptrain bench --servers`.

    dptrain bench --servers                     # 784-1024-1024-10 and 784-32-10, K = 1 and 2, 3 rounds
    python -m dptrain.scaling.bench_shards --servers 1,2,3 --rounds 5 --out benchmarks/shards.json

Every run is `dp.Trainer` on an embedded Ray: 2 workers, synthetic data (784 features, 10
classes), global batch 256, SGD with momentum, float32; the median step and the median
update (the server's `apply_s`) over the steps after a warm-up. With `--transport auto` the
workers read and write the node's shared memory and, with K > 1, the shards update their
ranges of it in place (docs/design.md, "Sharded parameter servers"); the rounds alternate
the K values so that they share the machine's moods. One run of K = 2 over the object store
(every shard's slices as Ray objects: what sharding cost on one node before) comes last,
for each model. Printed, and written to benchmarks/shards.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

WARMUP = 20  # steps left out: the first ones allocate, fault pages in and open the sessions
MODELS = ([784, 1024, 1024, 10], [784, 32, 10])


def run_once(model: list, servers: int, steps: int, workers: int, transport: str = "auto") -> dict:
    """One run's median step and update (ms), and how many workers were on shared memory."""
    from ..config import TrainConfig
    from ..distributed import Trainer
    cfg = TrainConfig(dataset="synthetic", model=model, workers=workers, servers=servers, transport=transport,
                      batch_size=256, steps=steps, optimizer="sgd", lr=0.01, momentum=0.9, dtype="float32", seed=0,
                      log_every=10**9, eval_every=None, cpus=max(os.cpu_count() or 1, workers + 1))
    result = Trainer(cfg).fit()
    records = [r for r in result.metrics["steps"] if r["step"] >= WARMUP]
    return {"step_ms": 1e3 * statistics.median(r["time_s"] for r in records),
            "update_ms": 1e3 * statistics.median(r["apply_s"] for r in records),
            "shared_memory_workers": result.summary["shared_memory_workers"]}


def main(argv=None) -> int:
    from .bench import write_results
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default="1,2", help="the K values, comma-separated (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the K values (default 3)")
    ap.add_argument("--steps", type=int, default=150, help=f"steps of each run (the first {WARMUP} are a warm-up)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/shards.json")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.servers.split(",")]
    except ValueError:
        ap.error(f"--servers must be whole numbers separated by commas, not {args.servers!r}")
    if not ks or min(ks) < 1 or args.rounds < 1 or args.steps <= WARMUP + 1 or args.workers < 1:
        ap.error(f"--servers must be >= 1, --rounds >= 1, --steps more than {WARMUP + 1} and --workers >= 1")
    import ray
    ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        for model in MODELS:
            name = "-".join(map(str, model))
            for r in range(args.rounds):
                for k in ks:
                    rows.append(dict(model=name, servers=k, transport="auto", round=r,
                                     **run_once(model, k, args.steps, args.workers)))
            rows.append(dict(model=name, servers=2, transport="object_store", round=0,
                             **run_once(model, 2, args.steps, args.workers, "object_store")))
    finally:
        ray.shutdown()
    print(f"{args.workers} workers, batch 256, SGD with momentum, float32; median of {args.steps - WARMUP} steps "
          f"a run, rounds alternated:")
    for model in MODELS:
        name = "-".join(map(str, model))
        for k, transport in [(k, "auto") for k in ks] + [(2, "object_store")]:
            mine = [r for r in rows if r["model"] == name and r["servers"] == k and r["transport"] == transport]
            print(f"  {name}, K = {k}, {transport}: step " + " / ".join(f"{r['step_ms']:.2f}" for r in mine)
                  + " ms, update " + " / ".join(f"{r['update_ms']:.2f}" for r in mine) + " ms")
    write_results(args.out, {"command": "dptrain bench --servers " + " ".join(argv if argv is not None else sys.argv[1:]),
                             "workers": args.workers, "batch": 256, "steps": args.steps, "warmup": WARMUP,
                             "rounds": args.rounds, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
