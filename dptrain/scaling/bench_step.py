"""A step by part at 2 workers over shared memory: by default the tiny model's, the fixed cost.

    dptrain bench --step                        # 2-8-2, batch 16, 2 workers, 1,000 steps
    python scripts/bench_step.py --steps 3000 --out benchmarks/step.json
    dptrain bench --step --model 784,1024,1024,10 --batch-size 256 --out /tmp/step.json

A model this small computes next to nothing, so its step is what every step pays whatever
the model (another MLP, `--model`, trains on synthetic data of its widths). The trainer runs
it on an embedded Ray, and every step's record carries its
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
(`Worker.compute`: "alone"). And how busy the machine's cores were over those steps (Linux:
/proc/stat, every process's time counted): the idle core-time of a step is the most that
overlapping its parts (a worker's next forward during the update, the update during the
backward) could put to use on this machine. Printed, and written to benchmarks/step.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

WARMUP = 50  # steps left out: the first ones allocate, fault pages in and open the sessions
TINY = [2, 8, 2]  # the default model, on moons (2 features, 2 classes)
BATCH = 16


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


def core_seconds() -> tuple[float, float] | None:
    """(busy, all) seconds of this machine's cores since boot (Linux's /proc/stat); None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def busy_share(before, after) -> float | None:
    """The share of the cores' time that was busy between two core_seconds() readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


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


def add_arguments(ap: argparse.ArgumentParser, batch_size: int | None = BATCH) -> None:
    """--model and --batch-size (`dptrain bench` shares them, with None: this module's default)."""
    ap.add_argument("--model", default=",".join(map(str, TINY)), type=widths,
                    help="the MLP's widths, inputs to classes (default %(default)s; other widths train on "
                         "synthetic data of that many features and classes)")
    ap.add_argument("--batch-size", type=int, default=batch_size, help=f"the global batch (default {BATCH})")


def widths(text: str) -> list:
    """--model's value (config.parse_model's): at least two positive integers, at least 2 classes."""
    from ..config import ConfigError, parse_model
    try:
        dims = parse_model(text)
    except ConfigError:
        dims = []
    if len(dims) < 2 or min(dims) < 1 or dims[-1] < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not an MLP's widths such as 784,1024,10 (positive "
                                         "integers, inputs to classes, at least 2 classes)")
    return dims


def main(argv=None) -> int:
    from .. import callbacks
    from ..config import TrainConfig
    from ..data import load_dataset
    from ..data.datasets import synthetic
    from ..distributed import Trainer
    from .bench import write_results
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="steps of the run (the first 50 are a warm-up)")
    ap.add_argument("--workers", type=int, default=2)
    add_arguments(ap)
    ap.add_argument("--out", default="benchmarks/step.json")
    args = ap.parse_args(argv)
    if args.steps <= WARMUP + 1 or args.workers < 1 or args.batch_size < args.workers:
        ap.error(f"--steps must be more than {WARMUP + 1}, --workers at least 1 and --batch-size at least --workers")
    dims = args.model
    dataset = (load_dataset("moons") if dims == TINY
               else synthetic(n_train=max(4 * args.batch_size, 1024), n_test=256, features=dims[0], classes=dims[-1]))
    cfg = TrainConfig(dataset=dataset.name, model=dims, workers=args.workers, batch_size=args.batch_size,
                      steps=args.steps, seed=0, dtype="float32", log_every=10**9, eval_every=None,
                      cpus=max(os.cpu_count() or 1, args.workers + 1))

    cores = {}  # core_seconds() at the end of the warm-up's last step and of the run's last

    class Cores(callbacks.Callback):
        def on_step(self, record):
            if record["step"] in (WARMUP, args.steps - 1):
                cores[record["step"]] = core_seconds()
    result = Trainer(cfg, dataset=dataset, callbacks=[Cores()]).fit()
    if result.summary["shared_memory_workers"] != args.workers:
        print(f"warning: {result.summary['shared_memory_workers']} of {args.workers} workers ran over shared memory",
              file=sys.stderr)
    measured = {k: 1e3 * statistics.median(v) for k, v in parts(result.metrics["steps"]).items() if v}
    before, after = cores.get(WARMUP), cores.get(args.steps - 1)
    busy = busy_share(before, after)
    if busy is not None:  # idle core-milliseconds per step over the steps after the warm-up
        measured["idle_core"] = 1e3 * ((after[1] - before[1]) - (after[0] - before[0])) / (args.steps - 1 - WARMUP)
    measured["alone"] = 1e3 * alone_s(cfg, dataset, min(args.steps, 2000))
    names = ("request", "stagger", "compute", "reply", "update", "between")
    model = "-".join(map(str, dims))
    print(f"{'tiny model (2-8-2)' if dims == TINY else model}, batch {args.batch_size}, {args.workers} workers "
          f"over shared memory, median of {args.steps - WARMUP} steps:")
    print(f"  step {measured['step']:.3f} ms = " + " + ".join(f"{k} {measured[k]:.3f}" for k in names[:-1])
          + f" (ms); then {measured['between']:.3f} ms between steps")
    print(f"  a worker's computation {measured['each']:.3f} ms in the run, {measured['alone']:.3f} ms alone "
          "(in one process, without Ray)")
    if busy is not None:
        print(f"  the machine's {os.cpu_count()} cores busy {100 * busy:.1f}% of those steps: "
              f"{measured['idle_core']:.3f} core-ms idle a step (the most overlap could use)")
    write_results(args.out, {"command": "dptrain bench --step " + " ".join(argv if argv is not None else sys.argv[1:]),
                             "model": model, "cpus": os.cpu_count(), "busy": busy,
                             "workers": args.workers, "batch": args.batch_size,
                             "steps": args.steps, "warmup": WARMUP, "ms": measured,
                             "shared_memory_workers": result.summary["shared_memory_workers"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
