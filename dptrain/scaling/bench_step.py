"""The fixed cost of a step, by part: the tiny model's step at 2 workers over shared memory.

    dptrain bench --step                        # 2-8-2, batch 16, 2 workers, 1,000 steps
    python scripts/bench_step.py --steps 3000 --out benchmarks/step.json

A model this small computes next to nothing, so its step is what every step pays whatever
the model. The trainer runs it on an embedded Ray, and every step's record carries its
timeline (wall clock: each worker's computation, and the server's update) and its length on
the server. From those, the medians over the steps after a warm-up of:

- request: from the step's start on the server to the first worker's start (the request
  over the control channel, the worker's wake-up);
- stagger: from the first worker's start to the last's;
- compute: from the last worker's start to the last worker's end;
- reply: from the last worker's end to the update's start (the replies, the server's wake-up
  and its reading of them);
- update: the server's mean gradient and optimizer step;

which add up to the step, each step; and
- between: from the update's end to the next step's start (the step's record, the loop);
- each: a worker's own computation (forward, backward, the gradient's finiteness check),

beside which the same worker's computation is timed in this process without Ray
(`Worker.compute`: "alone"). Printed, and written to benchmarks/step.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

WARMUP = 50  # steps left out: the first ones allocate, fault pages in and open the sessions


def parts(records: list) -> dict:
    """Per step (after WARMUP), the seconds of each part of the module's docstring; lists by part."""
    out = {k: [] for k in ("step", "request", "stagger", "compute", "reply", "update", "between", "each")}
    recs = [r for r in records if r.get("timeline") and not r.get("skipped")]
    for r, after in zip(recs, recs[1:] + [None]):
        if r["step"] < WARMUP:
            continue
        starts = [c[1] for c in r["timeline"]["compute"]]
        ends = [c[2] for c in r["timeline"]["compute"]]
        apply_start, apply_end = r["timeline"]["apply"]
        begin = apply_end - r["time_s"]  # the server measures a step from its start to its update's end
        out["step"].append(r["time_s"])
        out["request"].append(min(starts) - begin)
        out["stagger"].append(max(starts) - min(starts))
        out["compute"].append(max(ends) - max(starts))
        out["each"].extend(e - s for s, e in zip(starts, ends))
        out["reply"].append(apply_start - max(ends))
        out["update"].append(apply_end - apply_start)
        if after is not None:
            out["between"].append(after["timeline"]["apply"][1] - after["time_s"] - apply_end)
    return out


def alone_s(cfg, dataset, repeats: int) -> float:
    """Median seconds of worker 0's computation of its shard, called in this process (no Ray)."""
    import numpy as np

    from ..blocks import prepare
    from ..distributed.messages import Request
    from ..distributed.trainer import prepare_dataset
    from ..distributed.worker import Worker
    ds = prepare_dataset(dataset, cfg.dtype)
    factory, loss = prepare(cfg, ds)
    worker = Worker(cfg.to_dict(), factory, loss, ds, 0, cfg.workers)
    into = np.zeros(worker.replica.flat.size * worker.replica.flat.data.dtype.itemsize, dtype=np.uint8)
    times = []
    for step in range(WARMUP + repeats):
        t0 = time.perf_counter()
        worker.compute(Request(step), into=into)
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    from ..config import TrainConfig
    from ..data import load_dataset
    from ..distributed import Trainer
    from .bench import write_results
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="steps of the run (the first 50 are a warm-up)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/step.json")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP + 1 or args.workers < 1 or args.batch_size < args.workers:
        ap.error(f"--steps must be more than {WARMUP + 1}, --workers at least 1 and --batch-size at least --workers")
    cfg = TrainConfig(dataset="moons", model=[2, 8, 2], workers=args.workers, batch_size=args.batch_size,
                      steps=args.steps, seed=0, dtype="float32", log_every=10**9, eval_every=None,
                      cpus=max(os.cpu_count() or 1, args.workers + 1))
    dataset = load_dataset("moons")
    result = Trainer(cfg, dataset=dataset).fit()
    if result.summary["shared_memory_workers"] != args.workers:
        print(f"warning: {result.summary['shared_memory_workers']} of {args.workers} workers ran over shared memory",
              file=sys.stderr)
    measured = {k: 1e3 * statistics.median(v) for k, v in parts(result.metrics["steps"]).items() if v}
    measured["alone"] = 1e3 * alone_s(cfg, dataset, min(args.steps, 2000))
    names = ("request", "stagger", "compute", "reply", "update", "between")
    print(f"tiny model (2-8-2), batch {args.batch_size}, {args.workers} workers over shared memory, "
          f"median of {args.steps - WARMUP} steps:")
    print(f"  step {measured['step']:.3f} ms = " + " + ".join(f"{k} {measured[k]:.3f}" for k in names[:-1])
          + f" (ms); then {measured['between']:.3f} ms between steps")
    print(f"  a worker's computation {measured['each']:.3f} ms in the run, {measured['alone']:.3f} ms alone "
          "(in one process, without Ray)")
    write_results(args.out, {"command": "dptrain bench --step " + " ".join(argv if argv is not None else sys.argv[1:]),
                             "cpus": os.cpu_count(), "workers": args.workers, "batch": args.batch_size,
                             "steps": args.steps, "warmup": WARMUP, "ms": measured,
                             "shared_memory_workers": result.summary["shared_memory_workers"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
