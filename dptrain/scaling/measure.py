"""The measurements of `dptrain scale`: runs per worker count, the compute ceiling, the floors,
time to accuracy, and the cost model's inputs; and the arithmetic over their results.

The trainer is measured from outside its public API: `hooks.running` starts its
actors as `fit` does and runs blocks of steps with no logging or recovery.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .. import backend
from ..config import TrainConfig
from ..data import load_dataset
from . import costmodel

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
    from ..distributed import Trainer
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
    from ..blocks import prepare
    from ..step import Replica
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

    from ..distributed import Trainer
    from ..blocks import prepare
    from ..loop import LocalLoop
    from .hooks import running

    blocks = max(repeats * steps // block, 2)
    one = base.replace(workers=1, steps=blocks * block)
    data_ref = ray.put(dataset)
    loop = ray.remote(num_cpus=base.cpus_per_worker)(LocalLoop).remote(one, data_ref, *prepare(one, dataset),
                                                                        one.steps)
    local, dist, per_block = [], [], []
    with running(Trainer(one, dataset=dataset)) as trainer:
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
    tiny_result = _timed_fit(tiny_cfg, load_dataset("moons"))
    tiny = summarize_run(tiny_result.metrics["steps"], 2, "strong", 16, 0)
    shared = tiny_result.summary.get("shared_memory_workers", 0) == tiny_cfg.workers  # no Ray call a step
    return {"model": "-".join(map(str, base.model)), "batch": base.batch_size, "repeats": repeats,
            "local_step_ms": local_ms, "one_worker_step_ms": dist_ms, "one_worker_overhead": dist_ms / local_ms - 1,
            "blocks_ms": per_block, "block_steps": block,
            "actor_round_trip_ms": rtt_ms, "tiny_two_worker_step_ms": tiny["step_ms"],
            "tiny_transport": "shared memory" if shared else "object store",
            "tiny_added_ms": tiny["step_ms"] - 2 * rtt_ms,
            "driver_chained_empty_step_ms": fan_in_overhead_ms(2)}


def measure_cost_inputs(base: TrainConfig, one_worker: dict, rtt_ms: float, shared: bool):
    """The cost model's constants, from the 1-worker run and micro-measurements of this machine.

    Returns (this machine, a cluster). Both share the compute per example: the 1-worker
    compute time less a worker's passes over the flat buffer outside forward and backward
    (over shared memory the gradient's finiteness check only: the parameters are read in
    place; else the parameters' copy in too), over the batch. On this machine a worker's
    transport is that pass over shared memory (`shared`: the run used it), the fixed cost
    the 1-worker run's time outside compute and update (the control channel), and the
    server's adds and update run on as many threads as --update-threads auto gives them
    (their speedup U(T) measured here, for T up to this machine's cores); on a cluster the
    transport is Ray's object store, the fixed cost two actor round trips and the update
    one thread's.
    """
    import ray

    from .bench import time_interleaved
    from ..distributed.transport.shm import SharedArray
    from ..blocks import build_optimizer
    from ..nn import MLP
    from ..step import apply_mean_gradient

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
    passes = 1 if shared else 2
    per_example = max(one_worker["compute_ms"] / 1e3 - passes * g / copy_bw, 0.0) / base.batch_size
    common = dict(compute_s_per_example=per_example, grad_bytes=float(g),
                  memory_bytes_per_s=memory_bw, optimizer_s_per_byte=optimizer_s / g)
    cores = backend.usable_cores()
    speedup = None
    if not base.update_threads:  # auto: the threads the server takes, 1 + its node's workers
        times = {}
        for t in range(1, cores + 1):
            opt.threads = t
            times[t] = median_s(lambda: apply_mean_gradient(opt, [arr, other], 2 * base.batch_size, base.lr))
        opt.threads = 1
        speedup = {t: times[1] / s for t, s in times.items()}
    here = costmodel.CostInputs(**common, object_bytes_per_s=copy_bw if shared else object_bw,
                                fixed_s=one_worker["other_ms"] / 1e3 if shared else 2 * rtt_ms / 1e3,
                                cores=cores, parameters_in_place=shared, update_speedup=speedup)
    cluster = costmodel.CostInputs(**common, object_bytes_per_s=object_bw, fixed_s=2 * rtt_ms / 1e3)
    return here, cluster


def shard_update_s(base: TrainConfig, workers: int, servers: int, repeats: int = 10) -> float:
    """Median seconds of a sharded step's server part, measured apart from any step: `servers`
    ServerShard actors each take one update of `workers` gradient slices of its range, put in
    the object store beforehand as the workers' calls would leave them, and leave their new
    range there; the server waits for all (for their small step, as shards.Shards does). The cost model's
    term for the K > 1 server (it includes Ray's work on the megabyte arguments and results,
    which the model's bytes-over-bandwidth terms do not count)."""
    import ray

    from ..distributed.shards import ServerShard, bounds, sliced_state
    from ..blocks import build_optimizer
    from ..nn import MLP
    model = MLP(base.model, activation=base.activation, dtype=base.dtype, seed=base.seed)
    opt = build_optimizer(base, model.parameters())
    flat, state = opt.flat, opt.state_dict()
    ranges = bounds(flat.size, servers, flat.data.dtype.itemsize)
    actors = [ray.remote(ServerShard).options(num_cpus=0).remote(base.to_dict(), j) for j in range(servers)]
    try:
        ray.get([a.load.options(num_returns=2).remote(0, lo, flat.data[lo:hi], sliced_state(state, lo, hi))[0]
                 for a, (lo, hi) in zip(actors, ranges)])
        grad = np.random.default_rng(0).standard_normal(flat.size).astype(flat.data.dtype) * 1e-3
        times = []
        for step in range(repeats + 1):  # the first is a warm-up
            slices = [[ray.put(grad[lo:hi]) for lo, hi in ranges] for _ in range(workers)]
            t0 = time.perf_counter()
            ray.get([a.update.options(num_returns=2).remote(step, base.batch_size, base.lr, None,
                                                            *(s[j] for s in slices))[0]  # as the server waits
                     for j, a in enumerate(actors)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
    finally:
        for a in actors:
            ray.kill(a)


# --------------------------------------------------------------------------- compression and sharded servers

def variant_sweep(base: TrainConfig, dataset, worker_counts: list, field: str, values: list, repeats: int,
                  progress=None) -> list:
    """Strong-scaling runs of every value of the TrainConfig field `field` (compress, servers) at
    every worker count, round by round: step time, the bytes each worker sent per step (the
    payloads' measured lengths) and what the busiest server received per step (all the workers'
    bytes with one server; with K shards, the largest range's share of them)."""
    from ..distributed.shards import bounds
    from ..nn import MLP
    flat = MLP(base.model, activation=base.activation, dtype=base.dtype, seed=base.seed).flat()
    runs = []
    for rep in range(repeats):
        for value in values:
            cfg = base.replace(**{field: value})
            share = (max(hi - lo for lo, hi in bounds(flat.size, cfg.servers, flat.data.dtype.itemsize)) / flat.size
                     if cfg.servers > 1 else 1.0)
            for n in worker_counts:
                result = _timed_fit(cfg.replace(workers=n), dataset)
                run = summarize_run(result.metrics["steps"], n, "strong", base.batch_size, rep)
                run[field] = value
                run["sent_bytes_per_worker_step"] = result.summary["sent_bytes_per_worker_step"]
                run["server_bytes_per_step"] = n * run["sent_bytes_per_worker_step"] * share
                runs.append(run)
                if progress:
                    progress(f"{field} {value} N={n} #{rep + 1}: {run['step_ms']:.1f} ms/step")
    return runs


def aggregate_variants(runs: list, field: str, values: list) -> list:
    """Median over repeats of each (value of `field`, workers), in the order of `values`; bytes
    per worker and per server cut against the first value (the baseline) where it ran."""
    rows = []
    for value, n in sorted({(r[field], r["workers"]) for r in runs}, key=lambda k: (k[1], values.index(k[0]))):
        group = [r for r in runs if r[field] == value and r["workers"] == n]
        row = {field: value, "workers": n, "repeats": len(group)}
        for k in ("step_ms", "compute_ms", "apply_ms", "other_ms", "sent_bytes_per_worker_step",
                  "server_bytes_per_step"):
            row[k] = statistics.median(g[k] for g in group)
        rows.append(row)
    base = {r["workers"]: r for r in rows if r[field] == values[0]}
    for r in rows:
        b = base.get(r["workers"])
        r["bytes_cut"] = b["sent_bytes_per_worker_step"] / r["sent_bytes_per_worker_step"] if b else None
        r["server_bytes_cut"] = b["server_bytes_per_step"] / r["server_bytes_per_step"] if b else None
    return rows


def compression_costs(base: TrainConfig, settings: list) -> dict:
    """setting -> the cost model's compression terms for this model, measured here: ratio (payload
    bytes over the dense gradient's), encode_s (a worker's encoding of one gradient) and decode_s
    (the server's adding of one payload into a dense buffer)."""
    from .. import compress
    from ..nn import MLP
    from .bench import time_interleaved
    flat = MLP(base.model, activation=base.activation, dtype=base.dtype, seed=base.seed).flat()
    grad = np.random.default_rng(0).standard_normal(flat.size).astype(flat.data.dtype)
    out = {}
    for setting in settings:
        c = compress.make(setting, flat.size, flat.data.dtype)
        if c is None:
            continue
        buf = np.empty(c.max_bytes, np.uint8)
        dense = np.zeros_like(grad)
        meta = c.encode(grad, buf)
        times = time_interleaved({"encode": lambda x, y: c.encode(grad, buf),
                                  "decode": lambda x, y: c.decode_add(buf, meta, dense)}, None, None,
                                 repeats=10, warmup=1)
        out[setting] = {"ratio": meta["bytes"] / grad.nbytes, "encode_s": times["encode"],
                        "decode_s": times["decode"]}
    return out
