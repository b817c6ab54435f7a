"""Engine benchmark: one training step of the tensor engine against a hand-written numpy step.

    dptrain bench                                  # full run, about a minute on 2 cores
    dptrain bench --quick                          # fewer repeats, for a smoke test
    python scripts/bench_engine.py --out benchmarks/engine.json      # the same, as a script

Each step is forward, backward and an SGD update of an MLP on a batch of 256,
float32, with BLAS pinned to one thread. The hand-written step (explicit numpy
forward and backward of the same MLP) is the floor for any numpy engine; the
two are timed interleaved in the same run and the ratio engine / hand-written
is what we report (targets: <= 1.15 for 40-256-256-10, <= 1.05 for
784-1024-1024-10). It also times the scalar Value engine on a tiny MLP, per
parameter-sample, and measures memory: the peak traced allocation of one step
(target <= 1.5x the hand-written step's) and the growth over 1,000 steps. Then the
layers (dptrain/scaling/bench_layers.py): a step of the MNIST-1D CNN at batch 100 and of a
transformer block against hand-written numpy im2col of the same layers (target <= 1.2x),
and against PyTorch eager on one thread where torch is installed.
"""

from __future__ import annotations

import os

BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
if __name__ == "__main__":
    for _var in BLAS_THREADS:
        os.environ[_var] = "1"  # before numpy loads BLAS (`dptrain bench` runs this module so)

import argparse
import gc
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

import dptrain as dp
import dptrain.nn.functional as F

BATCH = 256
LR = 0.01


class HandWrittenMLP:
    """The same MLP (weights (out, in), torch layout) with forward and backward written out."""

    def __init__(self, model: dp.nn.MLP):
        self.params = [p.data.copy() for p in model.parameters()]  # W1, b1, W2, b2, ...

    def step(self, x, y):
        ws, bs = self.params[0::2], self.params[1::2]
        acts, pre = [x], []
        h = x
        for i, (w, b) in enumerate(zip(ws, bs)):
            z = h @ w.T
            z += b
            if i < len(ws) - 1:
                pre.append(z)
                h = np.maximum(z, 0)
                acts.append(h)
            else:
                h = z
        z = h - h.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = -np.log(p[rows, y]).mean()
        g = p
        g[rows, y] -= 1
        g /= len(y)
        grads = [None] * len(self.params)
        for i in range(len(ws) - 1, -1, -1):
            grads[2 * i] = g.T @ acts[i]
            grads[2 * i + 1] = g.sum(axis=0)
            if i > 0:
                g = g @ ws[i]
                g *= pre[i - 1] > 0
        for param, grad in zip(self.params, grads):
            param -= LR * grad
        return loss


class EngineMLP:
    def __init__(self, model: dp.nn.MLP):
        self.model = model
        self.opt = dp.optim.SGD(model.parameters(), lr=LR)

    def step(self, x, y):
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(dp.Tensor(x)), y)
        loss.backward()
        self.opt.step()
        return loss.data


def machine() -> dict:
    """What a benchmark's figures depend on besides the code: Python, numpy, the platform, the
    CPU and its cores, and the matrix kernels numpy's OpenBLAS runs (with OPENBLAS_CORETYPE,
    where it is set: the machine's environment may force older ones)."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"python": sys.version.split()[0], "numpy": np.__version__, "platform": platform.platform(),
            "cpu": cpu or platform.processor() or None, "cpus": os.cpu_count(),
            "blas_kernels": dp.backend.blas_kernels(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def write_results(path, results: dict) -> None:
    """Write a benchmark's results as JSON (the folder made as needed), with the `machine` they
    were measured on, and say where."""
    results = {**results, "machine": machine()}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def make_problem(dims, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, dims[0])).astype(np.float32)
    y = rng.integers(0, dims[-1], BATCH)
    model = dp.nn.MLP(dims, seed=seed)
    return x, y, model


def time_interleaved(fns: dict, x, y, repeats: int, warmup: int = 5) -> dict:
    """Median seconds per call of each function, alternating them so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x, y)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x, y)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def peak_step_bytes(step, x, y) -> int:
    """Peak traced allocation during one step, above what was allocated before it."""
    step(x, y)  # warm (the flat buffer and optimizer state exist already)
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    step(x, y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - base


def growth_over_steps(step, x, y, steps: int) -> dict:
    """Traced memory after 10 steps and after `steps` steps (no growth: the graph is released)."""
    tracemalloc.start()
    for _ in range(10):
        step(x, y)
    early = tracemalloc.get_traced_memory()[0]
    for _ in range(steps - 10):
        step(x, y)
    late = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"after_10_steps_bytes": early, f"after_{steps}_steps_bytes": late, "growth_bytes": late - early,
            "gc_objects_collected": gc.collect()}


def value_engine_seconds(dims, batch, repeats):
    """Seconds per training step (forward, backward, SGD) of the scalar Value engine."""
    rng = np.random.default_rng(0)
    layers = [[[dp.Value(rng.uniform(-1, 1) / np.sqrt(n_in)) for _ in range(n_in + 1)] for _ in range(n_out)]
              for n_in, n_out in zip(dims[:-1], dims[1:])]
    params = [v for layer in layers for neuron in layer for v in neuron]
    xs = rng.standard_normal((batch, dims[0]))
    ys = rng.integers(0, 2, batch) * 2 - 1

    def step():
        total = dp.Value(0.0)
        for xrow, yv in zip(xs, ys):
            h = list(xrow)
            for li, layer in enumerate(layers):
                out = []
                for neuron in layer:
                    act = neuron[-1]
                    for w, xi in zip(neuron[:-1], h):
                        act = act + w * xi
                    out.append(act.relu() if li < len(layers) - 1 else act)
                h = out
            total = total + (1 + -yv * h[0]).relu()  # hinge loss, as in micrograd's demo
        for p in params:
            p.grad = 0.0
        total.backward()
        for p in params:
            p.data -= LR * p.grad

    step()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), len(params)


def add_arguments(ap: argparse.ArgumentParser, out: str | None = "benchmarks/engine.json",
                  out_help: str = "where to write the results (JSON)") -> None:
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--out", default=out, help=out_help)


def add_parser(sub) -> None:
    """`dptrain bench`: runs this module in a fresh process with BLAS pinned to one thread;
    `dptrain bench --recipe`: nanoGPT's Shakespeare recipe beside PyTorch (bench_recipe.py)."""
    from . import bench_recipe, bench_step
    ap = sub.add_parser("bench", help="engine benchmark: a training step against hand-written numpy; "
                        "--recipe: nanoGPT's Shakespeare recipe beside PyTorch", description=__doc__.split("\n")[0])
    add_arguments(ap, out=None, out_help="where to write the results (JSON; default benchmarks/engine.json, with "
                                         "--recipe benchmarks/recipe.json, with --update benchmarks/update.json, "
                                         "with --step benchmarks/step.json, with --servers benchmarks/shards.json)")
    ap.add_argument("--update", action="store_true",
                    help="the parameter server's update (SGD, momentum, Adam, AdamW at 1.86 M and 20 M parameters) "
                         "with 1 and 2 threads, against a memory pass of the same bytes (bench_update.py)")
    ap.add_argument("--step", action="store_true",
                    help="the fixed cost of a step by part: the tiny 2-8-2 model (or --model) at 2 workers over "
                         "shared memory (request, stagger, compute, reply, update, idle core-time; bench_step.py)")
    ap.add_argument("--servers", action="store_true",
                    help="sharded servers on one node (K = 1, 2; shards over the node's shared memory, and K = 2 "
                         "over the object store) at 2 workers, 784-1024-1024-10 and 784-32-10 (bench_shards.py)")
    step = ap.add_argument_group("the step (--step)")
    bench_step.add_arguments(step, batch_size=None)
    recipe = ap.add_argument_group("the recipe (--recipe)")
    recipe.add_argument("--recipe", action="store_true",
                        help="run nanoGPT's Shakespeare recipe on dptrain (1, 2 workers) and PyTorch (1, 2 threads)")
    bench_recipe.add_arguments(recipe)


def run(args) -> int:
    import subprocess
    import sys
    env = dict(os.environ, **{v: "1" for v in BLAS_THREADS})
    if args.step:
        cmd = [sys.executable, "-m", "dptrain.scaling.bench_step", "--out", args.out or "benchmarks/step.json"]
        cmd += ["--steps", "300"] if args.quick else []
        cmd += ["--model", ",".join(map(str, args.model))]
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size is not None else []
    elif args.servers:
        cmd = [sys.executable, "-m", "dptrain.scaling.bench_shards", "--out", args.out or "benchmarks/shards.json"]
        cmd += ["--rounds", "1", "--steps", "40"] if args.quick else []
    elif args.update:
        cmd = [sys.executable, "-m", "dptrain.scaling.bench_update", "--out", args.out or "benchmarks/update.json"]
        cmd += ["--sizes", "1863690", "--repeats", "6"] if args.quick else []
    elif args.recipe:
        cmd = [sys.executable, "-m", "dptrain.scaling.bench_recipe", "--out", args.out or "benchmarks/recipe.json",
               "--steps", str(args.steps), "--text", args.text, "--torch-python", args.torch_python,
               "--runs", args.runs]
    else:
        cmd = [sys.executable, "-m", "dptrain.scaling.bench", "--out", args.out or "benchmarks/engine.json"]
        cmd += ["--quick"] if args.quick else []
    return subprocess.run(cmd, env=env).returncode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    quick = args.quick

    results = {"command": "dptrain bench" + (" --quick" if quick else ""),
               "batch": BATCH, "dtype": "float32", "mlps": {}}
    targets = {"40-256-256-10": 1.15, "784-1024-1024-10": 1.05}
    for dims, repeats in (([40, 256, 256, 10], 60 if quick else 600), ([784, 1024, 1024, 10], 8 if quick else 60)):
        name = "-".join(map(str, dims))
        x, y, model = make_problem(dims)
        hand, engine = HandWrittenMLP(model), EngineMLP(model)
        # the two implementations agree (same initial weights, same batch)
        np.testing.assert_allclose(hand.step(x, y), engine.step(x, y), rtol=1e-4)
        t = time_interleaved({"hand": hand.step, "engine": engine.step}, x, y, repeats)
        mem = {"hand_peak_bytes": peak_step_bytes(hand.step, x, y),
               "engine_peak_bytes": peak_step_bytes(engine.step, x, y)}
        mem["ratio"] = mem["engine_peak_bytes"] / mem["hand_peak_bytes"]
        res = {"hand_ms": 1e3 * t["hand"], "engine_ms": 1e3 * t["engine"], "ratio": t["engine"] / t["hand"],
               "target_ratio": targets[name], "params": model.num_parameters(), "memory": mem}
        results["mlps"][name] = res
        print(f"{name:>18}: hand-written {res['hand_ms']:7.2f} ms | engine {res['engine_ms']:7.2f} ms | "
              f"ratio {res['ratio']:.3f} (target <= {targets[name]}) | peak memory "
              f"{mem['engine_peak_bytes'] / 2**20:.1f} MiB vs {mem['hand_peak_bytes'] / 2**20:.1f} MiB "
              f"(ratio {mem['ratio']:.2f}, target <= 1.5)", flush=True)

    x, y, model = make_problem([40, 256, 256, 10])
    engine = EngineMLP(model)
    steps = 200 if quick else 1000
    gc.collect()
    growth = growth_over_steps(engine.step, x, y, steps)
    results["memory_growth"] = growth
    print(f"memory over {steps} steps (40-256-256-10): {growth['after_10_steps_bytes'] / 2**20:.2f} MiB after 10, "
          f"{growth[f'after_{steps}_steps_bytes'] / 2**20:.2f} MiB after {steps} "
          f"(growth {growth['growth_bytes']} bytes; {growth['gc_objects_collected']} objects left for the "
          "cycle collector)", flush=True)

    vdims, vbatch = [4, 16, 16, 1], 16
    v_s, v_params = value_engine_seconds(vdims, vbatch, 3 if quick else 10)
    small = results["mlps"]["40-256-256-10"]
    v_per = v_s / (v_params * vbatch)
    t_per = small["engine_ms"] / 1e3 / (small["params"] * BATCH)
    results["value_engine"] = {"dims": vdims, "batch": vbatch, "params": v_params, "step_ms": 1e3 * v_s,
                               "ns_per_param_sample": 1e9 * v_per,
                               "tensor_ns_per_param_sample": 1e9 * t_per, "tensor_speedup": v_per / t_per}
    print(f"Value engine, MLP {'-'.join(map(str, vdims))} batch {vbatch}: {1e3 * v_s:.1f} ms/step = "
          f"{1e9 * v_per:.0f} ns per parameter-sample; tensor engine (40-256-256-10): {1e9 * t_per:.2f} ns "
          f"-> {v_per / t_per:,.0f}x faster", flush=True)

    from . import bench_layers
    results["layers"] = bench_layers.run(time_interleaved, quick)

    write_results(args.out, results)


if __name__ == "__main__":
    main()
