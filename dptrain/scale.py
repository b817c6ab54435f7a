"""`dptrain scale`: throughput, speedup, efficiency and time-to-accuracy across worker counts.

    dptrain scale --workers 1,2,4 --out results/scale                       # the default study
    dptrain scale --workers 1,2 --steps 20 --repeats 1 --no-tta --out /tmp/s # a quick look
    dptrain scale --address auto --workers 1,2,4,8 ...                      # on a cluster

For every worker count it trains the model for a fixed number of steps, in strong
scaling (the global batch stays --batch-size) and weak scaling (each worker keeps
--batch-size / first count examples; the learning rate grows linearly with the
global batch, after a warm-up, as in Goyal et al. 2017), --repeats times, and
records steps/s, samples/s, speedup and efficiency against the smallest count, and
the step's breakdown: worker compute, server apply, and the rest (communication and
waiting). A time-to-accuracy phase trains MNIST-1D to --target-accuracy per worker
count. In the same run it measures the floors the trainer is held against (the
single-process loop; two Ray actor round trips) and fits the cost model
(dptrain/costmodel.py). It writes runs.jsonl, runs.csv, report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from . import costmodel
from .config import ConfigError, TrainConfig, parse_model
from .data import load_dataset

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # steps left out of every timing (actor start-up, first-touch of buffers)


# --------------------------------------------------------------------------- arithmetic

def speedup_table(rows: list, mode: str) -> list:
    """Add speedup and efficiency against the smallest worker count of the same mode.

    Strong scaling: speedup = T(base) / T(N) per step (the same global batch).
    Weak scaling: speedup = throughput(N) / throughput(base) (the batch grows with N).
    Efficiency = speedup / (N / base).
    """
    rows = sorted([r for r in rows if r["mode"] == mode], key=lambda r: r["workers"])
    if not rows:
        return []
    base = rows[0]
    for r in rows:
        if mode == "strong":
            r["speedup"] = base["step_ms"] / r["step_ms"]
        else:
            r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["efficiency"] = r["speedup"] / (r["workers"] / base["workers"])
    return rows


def summarize_run(steps: list, workers: int, mode: str, batch: int, repeat: int) -> dict:
    """One run's figures from its step records, the warm-up steps left out."""
    timed = steps[WARMUP_STEPS:] if len(steps) > WARMUP_STEPS else steps
    step_s = statistics.median(r["time_s"] for r in timed)
    compute = statistics.median(r.get("compute_s", 0.0) for r in timed)
    apply = statistics.median(r.get("apply_s", 0.0) for r in timed)
    return {"mode": mode, "workers": workers, "repeat": repeat, "batch": batch, "steps": len(timed),
            "step_ms": 1e3 * step_s, "steps_per_s": 1 / step_s, "samples_per_s": batch / step_s,
            "compute_ms": 1e3 * compute, "apply_ms": 1e3 * apply,
            "other_ms": max(1e3 * (step_s - compute - apply), 0.0)}


def aggregate(runs: list) -> list:
    """Median over repeats of each (mode, workers)."""
    out = []
    keys = sorted({(r["mode"], r["workers"]) for r in runs})
    for mode, n in keys:
        group = [r for r in runs if r["mode"] == mode and r["workers"] == n]
        row = {"mode": mode, "workers": n, "repeats": len(group), "batch": group[0]["batch"]}
        for k in ("step_ms", "steps_per_s", "samples_per_s", "compute_ms", "apply_ms", "other_ms"):
            row[k] = statistics.median(g[k] for g in group)
        out.append(row)
    return out


# --------------------------------------------------------------------------- measurements

def _timed_fit(cfg: TrainConfig, dataset):
    from .distributed import Trainer
    return Trainer(cfg, dataset=dataset).fit()


def sweep(base: TrainConfig, dataset, worker_counts: list, modes: list, repeats: int, progress=None,
          ceiling: bool = False) -> tuple[list, list]:
    """Every (mode, worker count) `repeats` times, round by round: each round runs every point
    once, so a slow spell of the machine hits all points of a round rather than all repeats
    of one point. With `ceiling`, each round also measures the compute ceiling right after
    its strong-scaling runs. Returns (runs, ceiling rows), each row tagged with its round."""
    runs, ceilings = [], []
    first = worker_counts[0]
    per_worker = max(base.batch_size // first, 1)
    for rep in range(repeats):
        for mode in modes:
            for n in worker_counts:
                if mode == "strong":
                    cfg = base.replace(workers=n, batch_size=base.batch_size)
                else:  # weak: fixed per-worker batch, linear learning-rate scaling with warm-up
                    cfg = base.replace(workers=n, batch_size=per_worker * n, lr=base.lr * n / first,
                                       warmup=max(base.warmup, WARMUP_STEPS))
                result = _timed_fit(cfg, dataset)
                run = summarize_run(result.metrics["steps"], n, mode, cfg.batch_size, rep)
                run["shared_memory_workers"] = result.summary.get("shared_memory_workers", 0)
                runs.append(run)
                if progress:
                    progress(f"{mode} N={n} #{rep + 1}: {run['step_ms']:.1f} ms/step")
            if mode == "strong" and ceiling:
                ceilings += [dict(row, repeat=rep) for row in compute_ceiling(base, dataset, worker_counts, base.steps)]
    return runs, ceilings


def median_ceilings(ceilings: list) -> list:
    """The compute ceiling per worker count: medians over the rounds that measured it."""
    out = []
    for n in sorted({c["workers"] for c in ceilings}):
        group = [c for c in ceilings if c["workers"] == n]
        out.append({"workers": n, "examples_each": group[0]["examples_each"],
                    "compute_ms": statistics.median(c["compute_ms"] for c in group),
                    "ceiling_speedup": statistics.median(c["ceiling_speedup"] for c in group), "rounds": len(group)})
    return out


def paired_strong(runs: list, ceilings: list) -> list:
    """Strong-scaling speedup within each round (the smallest count's step over N's, both
    measured minutes apart), next to that round's compute ceiling: medians over rounds of the
    speedup, the ceiling and their ratio (the share of the attainable speedup reached)."""
    strong = [r for r in runs if r["mode"] == "strong"]
    if not strong:
        return []
    first = min(r["workers"] for r in strong)
    rows = []
    for n in sorted({r["workers"] for r in strong}):
        speedups, ceils, shares = [], [], []
        for rep in sorted({r["repeat"] for r in strong}):
            base = next((r for r in strong if r["repeat"] == rep and r["workers"] == first), None)
            this = next((r for r in strong if r["repeat"] == rep and r["workers"] == n), None)
            if base is None or this is None:
                continue
            speedups.append(base["step_ms"] / this["step_ms"])
            ceil = next((c for c in ceilings if c["repeat"] == rep and c["workers"] == n), None)
            if ceil is not None:
                ceils.append(ceil["ceiling_speedup"])
                shares.append(speedups[-1] / ceil["ceiling_speedup"])
        med = (lambda xs: statistics.median(xs) if xs else None)
        rows.append({"workers": n, "rounds": len(speedups), "speedup": med(speedups), "ceiling": med(ceils),
                     "of_ceiling": med(shares), "speedups": speedups, "ceilings": ceils})
    return rows


def time_to_accuracy(base: TrainConfig, worker_counts: list, target: float, max_epochs: int, progress=None):
    """Wall time for each worker count to reach `target` test accuracy on MNIST-1D."""
    dataset = load_dataset("mnist1d")
    rows, curves = [], {}
    for n in worker_counts:
        cfg = base.replace(dataset="mnist1d", data=None, model=None, workers=n, epochs=max_epochs, steps=None,
                           target_accuracy=target, batch_size=256, lr=0.1, optimizer="sgd", momentum=0.9,
                           warmup=0, schedule="constant")
        result = _timed_fit(cfg, dataset)
        s = result.summary
        rows.append({"workers": n, "target_accuracy": target, "time_to_target_s": s.get("time_to_target_s"),
                     "steps": s.get("target_step") + 1 if s.get("target_step") is not None else None,
                     "final_test_accuracy": s.get("test_accuracy")})
        elapsed, curve = 0.0, []
        for r in result.metrics["steps"]:
            elapsed += r["time_s"]
            curve.append((elapsed, r["loss"]))
        curves[n] = curve
        if progress:
            t = rows[-1]["time_to_target_s"]
            progress(f"time to {target:.0%}, N={n}: " + (f"{t:.1f} s" if t is not None else "not reached"))
    return rows, curves


def _compute_only_ms(config: dict, dataset, batch: int, steps: int) -> float:
    """Median time of forward and backward on `batch` examples in this process (no transport)."""
    from .loop import Replica, prepare
    cfg = TrainConfig.from_dict(config)
    replica = Replica(cfg, dataset, *prepare(cfg, dataset))
    idx = np.arange(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        replica.compute_gradients(idx)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[WARMUP_STEPS:])


def compute_ceiling(base: TrainConfig, dataset, worker_counts: list, steps: int) -> list:
    """The best strong-scaling speedup this machine allows: N processes (Ray tasks of
    cpus_per_worker CPUs) each computing forward and backward on B/N examples at once,
    against one process on B; no parameters or gradients move."""
    import ray
    task = ray.remote(num_cpus=base.cpus_per_worker)(_compute_only_ms)
    data_ref = ray.put(dataset)
    rows, one = [], None
    for n in worker_counts:
        share = max(base.batch_size // n, 1)
        times = ray.get([task.remote(base.to_dict(), data_ref, share, steps) for _ in range(n)])
        slowest = max(times)
        one = slowest if one is None else one
        rows.append({"workers": n, "examples_each": share, "compute_ms": slowest, "ceiling_speedup": one / slowest})
    return rows


def fan_in_overhead_ms(workers: int, steps: int = 300) -> float:
    """Ray's own cost per step of the driver-chained pattern with empty actors:
    N worker calls, then a server call that takes their results, chained through the driver."""
    import ray

    @ray.remote(num_cpus=0)
    class Empty:
        def compute(self, params=None, step=0):
            return None, {}

        def apply(self, step, *results):
            return step, {}

    ws, ps = [Empty.remote() for _ in range(workers)], Empty.remote()
    ray.get([w.compute.remote() for w in ws] + [ps.compute.remote()])
    apply = ps.apply.options(num_returns=2)
    params, pending = 0, []
    t0 = time.perf_counter()
    for step in range(steps):
        params, metrics = apply.remote(step, *[w.compute.remote(params, step) for w in ws])
        pending.append(metrics)
        if len(pending) > 2:
            ray.get(pending.pop(0))
    ray.get(pending)
    elapsed = time.perf_counter() - t0
    for a in ws + [ps]:
        ray.kill(a)
    return 1e3 * elapsed / steps


def measure_floors(base: TrainConfig, dataset, steps: int, repeats: int = 3, block: int = 10) -> dict:
    """The trainer against its floors, measured here and now.

    - 1 worker against the single-process loop on the same model, data and batch: both kept
      running side by side (the loop in a Ray actor of the worker's CPUs, so one BLAS thread
      each), they take turns in blocks of `block` steps, `repeats` * `steps` / `block` turns
      in all, and the overhead is the ratio of the medians over every step but the first
      two of each block: a slow spell of the machine hits both alike;
    - a tiny model's step with 2 workers against two blocking Ray actor round trips.
    """
    import ray

    from .distributed import Trainer
    from .loop import LocalLoop, prepare

    blocks = max(repeats * steps // block, 2)
    one = base.replace(workers=1, steps=blocks * block)
    data_ref = ray.put(dataset)
    loop = ray.remote(num_cpus=base.cpus_per_worker)(LocalLoop).remote(one, data_ref, *prepare(one, dataset),
                                                                        one.steps)
    local, dist, per_block = [], [], []
    trainer = Trainer(one, dataset=dataset)
    with trainer.started():
        for b in range(blocks):
            first = b * block
            lt = [r["time_s"] for r in ray.get(loop.run.remote(first, block))][2:]
            dt = [r["step_s"] for r in trainer.run_block(first, block)][2:]
            local += lt
            dist += dt
            per_block.append([1e3 * statistics.median(lt), 1e3 * statistics.median(dt)])
    ray.kill(loop)
    local_ms, dist_ms = 1e3 * statistics.median(local), 1e3 * statistics.median(dist)

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self, x=None):
            return x

    echo = Echo.remote()
    ray.get(echo.ping.remote())
    rtts = []
    for _ in range(300):
        t0 = time.perf_counter()
        ray.get(echo.ping.remote())
        rtts.append(time.perf_counter() - t0)
    ray.kill(echo)
    rtt_ms = 1e3 * statistics.median(rtts)
    tiny_cfg = TrainConfig(dataset="moons", model=[2, 8, 2], workers=2, batch_size=16, steps=300, seed=base.seed,
                           log_every=10**6, address=base.address, transport=base.transport)
    tiny = summarize_run(_timed_fit(tiny_cfg, load_dataset("moons")).metrics["steps"], 2, "strong", 16, 0)
    return {"model": "-".join(map(str, base.model)), "batch": base.batch_size, "repeats": repeats,
            "local_step_ms": local_ms, "one_worker_step_ms": dist_ms, "one_worker_overhead": dist_ms / local_ms - 1,
            "blocks_ms": per_block, "block_steps": block,
            "actor_round_trip_ms": rtt_ms, "tiny_two_worker_step_ms": tiny["step_ms"],
            "tiny_added_ms": tiny["step_ms"] - 2 * rtt_ms,
            "driver_chained_empty_step_ms": fan_in_overhead_ms(2)}


def measure_cost_inputs(base: TrainConfig, one_worker: dict, rtt_ms: float, shared: bool):
    """The cost model's constants, from the 1-worker run and micro-measurements of this machine.

    Returns (this machine, a cluster). Both share the compute per example: the 1-worker
    compute time less a worker's two passes over the flat buffer (parameters in, the
    gradient's finiteness check), over the batch. On this machine a worker's transport is
    those two passes over shared memory (`shared`: the run used it) and the fixed cost is the
    1-worker run's time outside compute and update (the control channel); on a cluster the
    transport is Ray's object store and the fixed cost two actor round trips.
    """
    import ray

    from .bench import time_interleaved
    from .distributed.shm import SharedArray
    from .loop import build_optimizer
    from .nn import MLP

    def median_s(fn) -> float:  # one operation at a time, 10 calls
        return time_interleaved({"op": lambda x, y: fn()}, None, None, repeats=10, warmup=0)["op"]

    model = MLP(base.model, activation=base.activation, dtype=base.dtype, seed=base.seed)
    opt = build_optimizer(base, model.parameters())
    flat = model.flat()
    g = flat.data.nbytes
    arr = np.random.default_rng(0).standard_normal(flat.size).astype(flat.data.dtype)
    object_bw = g / median_s(lambda: ray.get(ray.put(arr)))
    other = arr.copy()
    memory_bw = g / median_s(lambda: np.add(other, arr, out=other))
    optimizer_s = median_s(lambda: opt.update(flat.data, flat.grad))
    seg = SharedArray.create(flat.size, flat.data.dtype, "costmodel")
    try:
        seg.array[:] = arr
        copy_bw = g / median_s(lambda: np.copyto(other, seg.array))
    finally:
        seg.close()
    per_example = max(one_worker["compute_ms"] / 1e3 - 2 * g / copy_bw, 0.0) / base.batch_size
    common = dict(compute_s_per_example=per_example, grad_bytes=float(g),
                  memory_bytes_per_s=memory_bw, optimizer_s_per_byte=optimizer_s / g)
    here = costmodel.CostInputs(**common, object_bytes_per_s=copy_bw if shared else object_bw,
                                fixed_s=one_worker["other_ms"] / 1e3 if shared else 2 * rtt_ms / 1e3,
                                cores=os.cpu_count() or 1)
    cluster = costmodel.CostInputs(**common, object_bytes_per_s=object_bw, fixed_s=2 * rtt_ms / 1e3)
    return here, cluster


# --------------------------------------------------------------------------- output

def write_csv(path: Path, rows: list) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown_table(rows: list, columns: list) -> str:
    """columns: (header, key, digits)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), d) for _, k, d in columns) + " |")
    return "\n".join(lines)


def plots(out: Path, table: dict, curves: dict) -> list:
    """throughput.png, efficiency.png and loss_vs_time.png; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install 'dptrain[plots]')")
        return []
    made = []
    for name, key, ylabel in (("throughput.png", "samples_per_s", "samples / s"),
                              ("efficiency.png", "efficiency", "parallel efficiency")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, rows in table.items():
            if rows:
                ax.plot([r["workers"] for r in rows], [r[key] for r in rows], "o-", label=f"{mode} scaling")
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        counts = sorted({r["workers"] for rows in table.values() for r in rows})
        ax.set_xticks(counts, [str(n) for n in counts])  # 1, 2, 4 rather than 2^0, 2^1, 2^2
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n, curve in sorted(curves.items()):
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=f"{n} worker(s)", lw=1)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("training loss (MNIST-1D)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_vs_time.png", dpi=120)
        plt.close(fig)
        made.append("loss_vs_time.png")
    return made


def report(command: str, base: TrainConfig, table: dict, floors: dict | None, tta: list, model: dict | None,
           images: list) -> str:
    cols = [("workers", "workers", 0), ("global batch", "batch", 0), ("ms/step", "step_ms", 1),
            ("steps/s", "steps_per_s", 1), ("samples/s", "samples_per_s", 0), ("speedup", "speedup", 2),
            ("efficiency", "efficiency", 2), ("compute ms", "compute_ms", 1), ("apply ms", "apply_ms", 1),
            ("other ms", "other_ms", 1)]
    parts = [f"Measured by `{command}` on {datetime.date.today()} ({os.cpu_count()} CPUs), model "
             f"{'-'.join(map(str, base.model))}, {base.dtype}, dataset {base.dataset}. Medians over repeats of the "
             f"median step after {WARMUP_STEPS} warm-up steps; compute = the slowest worker's step, apply = the "
             "server's update, other = communication and waiting."]
    for mode, rows in table.items():
        if rows:
            parts.append(f"### {mode.capitalize()} scaling\n\n" + markdown_table(rows, cols))
    if floors:
        parts.append("### Against the floors\n\n" + markdown_table([
            {"what": f"1 worker vs the single-process loop ({floors['model']}, batch {floors['batch']})",
             "floor": f"{floors['local_step_ms']:.2f} ms", "trainer": f"{floors['one_worker_step_ms']:.2f} ms",
             "difference": f"{100 * floors['one_worker_overhead']:+.1f}% ({len(floors['blocks_ms'])} alternating "
                          f"blocks of {floors['block_steps']} steps)"},
            {"what": "tiny model (2-8-2), 2 workers, vs two actor round trips",
             "floor": f"2 x {floors['actor_round_trip_ms']:.2f} ms",
             "trainer": f"{floors['tiny_two_worker_step_ms']:.2f} ms",
             "difference": f"{floors['tiny_added_ms']:+.2f} ms"},
            {"what": "for comparison: empty actors, 2 worker calls then a server call chained through the driver",
             "floor": f"2 x {floors['actor_round_trip_ms']:.2f} ms",
             "trainer": f"{floors['driver_chained_empty_step_ms']:.2f} ms", "difference": "(Ray alone)"}],
            [("", "what", 0), ("floor", "floor", 0), ("trainer", "trainer", 0), ("difference", "difference", 0)]))
        if floors.get("ceiling"):
            parts.append("### Compute ceiling (no communication)\n\nN processes at once, each running forward "
                         "and backward on B/N examples, against one process on B: the best strong-scaling "
                         "speedup this machine allows before any transfer or update. Measured in every round, "
                         "right after that round's strong-scaling runs; medians over rounds.\n\n"
                         + markdown_table(floors["ceiling"], [("workers", "workers", 0), ("examples each", "examples_each", 0),
                                                              ("slowest ms", "compute_ms", 1),
                                                              ("ceiling speedup", "ceiling_speedup", 2),
                                                              ("rounds", "rounds", 0)]))
        if floors.get("paired_strong"):
            rows = [dict(r, per_round=" / ".join(f"{a:.2f} of {b:.2f}" for a, b in zip(r["speedups"], r["ceilings"])))
                    for r in floors["paired_strong"]]
            parts.append("### Strong scaling against the ceiling, round by round\n\nThe trainer's speedup within "
                         "each round next to the ceiling measured in the same round (this machine's speed drifts "
                         "by 10-25% between minutes; a round's points are minutes apart at most).\n\n"
                         + markdown_table(rows, [("workers", "workers", 0), ("speedup", "speedup", 2),
                                                 ("ceiling", "ceiling", 2), ("share of ceiling", "of_ceiling", 2),
                                                 ("per round: speedup of ceiling", "per_round", 0)]))
    if tta:
        parts.append("### Time to accuracy (MNIST-1D, 40-256-256-10, batch 256, SGD 0.1 momentum 0.9)\n\n"
                     + markdown_table(tta, [("workers", "workers", 0), ("target", "target_accuracy", 2),
                                            ("seconds", "time_to_target_s", 1), ("steps", "steps", 0),
                                            ("final test accuracy", "final_test_accuracy", 3)]))
    if model:
        parts.append(model["markdown"])
    if images:
        parts.append("\n".join(f"![{i}]({i})" for i in images))
    return "\n\n".join(parts) + "\n"


def cost_model_section(inp: costmodel.CostInputs, cluster_inp: costmodel.CostInputs, measured: dict, batch: int,
                       network_gbit: float) -> dict:
    """The check of `inp` (this machine) against the measured steps, and predictions from
    `cluster_inp` with a server link of `network_gbit`."""
    errors = costmodel.relative_errors(inp, measured, batch)
    check = [{"workers": n, "measured_ms": 1e3 * t, "predicted_ms": 1e3 * costmodel.step_time(inp, n, batch)["step_s"],
              "error": errors[n]} for n, t in sorted(measured.items())]
    cluster = costmodel.CostInputs(**{**cluster_inp.to_dict(), "cores": 10**9,
                                      "server_bytes_per_s": network_gbit * 1e9 / 8})
    counts = [8, 16, 32, 64, 128, 256]
    predictions = {k: costmodel.scaling(cluster, [1] + counts, batch, shards=k) for k in (1, 4, 16)}
    pred_rows = []
    for n in counts:
        row = {"workers": n}
        for k, rows in predictions.items():
            r = next(x for x in rows if x["workers"] == n)
            row[f"ms_K{k}"] = 1e3 * r["step_s"]
            row[f"speedup_K{k}"] = r["speedup"]
            row[f"eff_K{k}"] = r["efficiency"]
        pred_rows.append(row)
    nstar = {k: costmodel.server_bound_workers(cluster, batch, k) for k in (1, 4, 16)}
    md = ["### Cost model", "",
          "Inputs measured in this run: " + ", ".join([
              f"compute {1e6 * inp.compute_s_per_example:.1f} us/example",
              f"gradient {inp.grad_bytes / 2**20:.2f} MiB",
              f"memory pass {inp.memory_bytes_per_s / 1e9:.2f} GB/s",
              f"optimizer {1e9 * inp.optimizer_s_per_byte:.2f} ns/byte"]) + "; on this machine "
          + f"a worker's transport {inp.object_bytes_per_s / 1e9:.2f} GB/s (two passes per step) and a fixed "
          + f"{1e3 * inp.fixed_s:.2f} ms per step; on a cluster Ray's object store "
          + f"{cluster_inp.object_bytes_per_s / 1e9:.2f} GB/s (put+get) and a fixed {1e3 * cluster_inp.fixed_s:.2f} ms "
          "(two actor round trips).", "",
          "Check against the measured strong-scaling steps on this machine"
          + (" (compute speedup P(N) = the measured compute ceiling: "
             + ", ".join(f"{v:.2f} for {k}" for k, v in sorted(inp.parallel_speedup.items())) + ")"
             if inp.parallel_speedup else f" (compute shared by {inp.cores} cores)") + ":", "",
          markdown_table(check, [("workers", "workers", 0), ("measured ms", "measured_ms", 1),
                                 ("predicted ms", "predicted_ms", 1), ("error", "error", 2)]), "",
          f"Predictions for a cluster (a core set per worker, a {network_gbit:g} Gbit/s link at each server "
          f"shard), global batch {batch}, K server shards:", "",
          markdown_table(pred_rows, [("workers", "workers", 0)] + [
              (h.format(k=k), key.format(k=k), d) for k in (1, 4, 16)
              for h, key, d in (("ms K={k}", "ms_K{k}", 1), ("speedup K={k}", "speedup_K{k}", 2),
                                ("eff. K={k}", "eff_K{k}", 2))]), "",
          "The server's link saturates (its traffic per step equals the compute time) at N* = "
          + ", ".join(f"{v:.1f} workers for K={k}" for k, v in nstar.items())
          + ": beyond N*, one server makes every added worker slow the step down; K shards raise N* by sqrt(K)."]
    return {"markdown": "\n".join(md), "check": check, "predictions": pred_rows, "n_star": nstar,
            "inputs": inp.to_dict(), "cluster_inputs": cluster.to_dict()}


# --------------------------------------------------------------------------- command

def add_parser(sub) -> None:
    p = sub.add_parser("scale", help="scaling experiment: throughput, speedup, efficiency across worker counts",
                       description=__doc__.split("\n\n")[2] if __doc__ else None)
    p.add_argument("--workers", default="1,2,4", metavar="LIST", help="worker counts (default: 1,2,4)")
    p.add_argument("--mode", choices=["strong", "weak", "both"], default="both", help="scaling mode (default: both)")
    p.add_argument("--dataset", default="synthetic", metavar="NAME", help="dataset for the timing runs (default: synthetic)")
    p.add_argument("--model", default="784,1024,1024,10", metavar="SIZES", help="layer sizes (default: 784,1024,1024,10)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="global batch of strong scaling; weak scaling keeps batch/first-count per worker (default: 256)")
    p.add_argument("--steps", type=int, default=40, metavar="N", help=f"steps per run, {WARMUP_STEPS} of them warm-up (default: 40)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per point (default: 3)")
    p.add_argument("--lr", type=float, default=0.01, metavar="X", help="learning rate at the first count (default: 0.01)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--target-accuracy", type=float, default=0.6, metavar="X",
                   help="MNIST-1D test accuracy for the time-to-accuracy phase (default: 0.6)")
    p.add_argument("--max-epochs", type=int, default=60, metavar="N", help="epoch limit of that phase (default: 60)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="run the time-to-accuracy phase")
    p.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the overhead floors and fit the cost model")
    p.add_argument("--network-gbit", type=float, default=10.0, metavar="X",
                   help="server link bandwidth assumed by the cluster predictions (default: 10 Gbit/s)")
    p.add_argument("--address", default=None, metavar="auto|HOST:PORT", help="a Ray cluster; none: embedded local Ray")
    p.add_argument("--cpus", type=int, default=None, metavar="N", help="logical CPUs of the embedded Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="X")
    p.add_argument("--transport", choices=["auto", "object_store"], default="auto")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/scale-<time>)")
    p.add_argument("--quiet", action="store_true")


def _counts(text: str) -> list:
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise ConfigError(f"invalid --workers: {text!r} (expected a list like 1,2,4)") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"invalid --workers: {text!r} (counts must be >= 1)")
    return counts


def run(args) -> int:
    counts = _counts(args.workers)
    if args.steps <= WARMUP_STEPS:
        raise ConfigError(f"invalid --steps: {args.steps} (must exceed the {WARMUP_STEPS} warm-up steps)", field="steps")
    if args.repeats < 1:
        raise ConfigError(f"invalid --repeats: {args.repeats} (must be >= 1)", field="repeats")
    modes = ["strong", "weak"] if args.mode == "both" else [args.mode]
    base = TrainConfig(dataset=args.dataset, model=parse_model(args.model), workers=counts[0],
                       batch_size=args.batch_size, steps=args.steps, lr=args.lr, dtype=args.dtype, seed=args.seed,
                       address=args.address, cpus=args.cpus, cpus_per_worker=args.cpus_per_worker,
                       transport=args.transport, log_every=10**6, momentum=0.9)
    for n in counts:  # every point must be a valid run before any starts
        base.replace(workers=n)
    dataset = load_dataset(args.dataset)
    from .loop import prepare
    prepare(base, dataset)  # a model that does not fit the data is refused before anything runs

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"scale-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    command = "dptrain scale " + " ".join(args.argv) if getattr(args, "argv", None) else "dptrain scale"

    from .distributed.cluster import connect, embedded_cpus
    import ray
    started = connect(args.address, num_cpus=embedded_cpus(max(counts), args.cpus_per_worker, args.cpus))
    logging.getLogger("dptrain.loop").setLevel(logging.WARNING)  # a sweep logs per run, not per step
    logging.getLogger("dptrain.distributed.trainer").setLevel(logging.WARNING)
    total = len(modes) * len(counts) * args.repeats + (len(counts) if args.tta else 0) + (1 if args.floors else 0)
    from tqdm import tqdm
    bar = tqdm(total=total, unit="run", disable=args.quiet, dynamic_ncols=True)

    def progress(msg):
        bar.update(1)
        bar.set_postfix_str(msg, refresh=True)
    try:
        runs, ceilings = sweep(base, dataset, counts, modes, args.repeats, progress,
                               ceiling=args.floors and "strong" in modes)
        with open(out / "runs.jsonl", "w") as f:
            for r in runs:
                f.write(json.dumps(r) + "\n")
        table = {mode: speedup_table(aggregate(runs), mode) for mode in modes}
        write_csv(out / "runs.csv", [r for rows in table.values() for r in rows])
        floors = model = None
        if args.floors:
            floors = measure_floors(base, dataset, args.steps, repeats=max(args.repeats, 3))
            if not ceilings:  # weak scaling only: one ceiling measurement
                ceilings = [dict(r, repeat=0) for r in compute_ceiling(base, dataset, counts, args.steps)]
            floors["ceiling"] = median_ceilings(ceilings)
            floors["paired_strong"] = paired_strong(runs, ceilings)
            progress("floors")
            strong = {r["workers"]: r for r in table.get("strong", [])}
            if 1 in strong:
                shared = any(r.get("shared_memory_workers") for r in runs if r["mode"] == "strong")
                inp, cluster_inp = measure_cost_inputs(base, strong[1], floors["actor_round_trip_ms"], shared)
                # the compute ceiling measured in the same rounds is this machine's P(N)
                inp = costmodel.CostInputs(**{**inp.to_dict(), "parallel_speedup": {
                    c["workers"]: c["ceiling_speedup"] for c in floors["ceiling"]}})
                measured = {n: strong[n]["step_ms"] / 1e3 for n in strong if n <= 4}
                model = cost_model_section(inp, cluster_inp, measured, base.batch_size, args.network_gbit)
            (out / "floors.json").write_text(json.dumps(floors, indent=2) + "\n")
        tta, curves = [], {}
        if args.tta:
            tta, curves = time_to_accuracy(base, counts, args.target_accuracy, args.max_epochs, progress)
            write_csv(out / "time_to_accuracy.csv", tta)
        if model:
            (out / "costmodel.json").write_text(json.dumps({k: v for k, v in model.items() if k != "markdown"},
                                                           indent=2, default=str) + "\n")
        images = plots(out, table, curves)
        (out / "report.md").write_text(report(command, base, table, floors, tta, model, images))
    finally:
        bar.close()
        if started:
            ray.shutdown()
    for mode, rows in table.items():
        for r in rows:
            print(f"{mode:>6} N={r['workers']:<3} {r['step_ms']:8.1f} ms/step {r['samples_per_s']:10,.0f} samples/s "
                  f"speedup {r['speedup']:5.2f} efficiency {r['efficiency']:4.2f}")
    for r in (floors or {}).get("paired_strong", []):
        if r["ceiling"] is not None and r["workers"] > 1:
            print(f"strong N={r['workers']:<3} speedup {r['speedup']:.2f} within rounds, ceiling {r['ceiling']:.2f} "
                  f"(share {r['of_ceiling']:.2f})")
    if floors:
        print(f"1 worker vs single process: {floors['one_worker_step_ms']:.1f} vs {floors['local_step_ms']:.1f} ms "
              f"({100 * floors['one_worker_overhead']:+.1f}%); tiny model with 2 workers: {floors['tiny_two_worker_step_ms']:.2f} ms "
              f"= 2 x {floors['actor_round_trip_ms']:.2f} ms round trips {floors['tiny_added_ms']:+.2f} ms")
    print(f"results: {out}/ (report.md, runs.jsonl, runs.csv{', plots' if images else ''})")
    return 0
