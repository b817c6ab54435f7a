"""GPU benchmark: one training step of the engine on cupy against the same step on numpy.

    python scripts/bench_gpu.py                       # needs cupy and a CUDA GPU
    python scripts/bench_gpu.py --out benchmarks/gpu.json

Times forward, backward and an SGD update of MLPs (40-256-256-10 and
784-1024-1024-10) at batch 256 and 4096, float32, on the CPU (numpy, all its BLAS
threads) and on the GPU (cupy, synchronised before the clock stops). Prints the
median milliseconds per step and the speed-up, and writes them to a JSON file.
"""

import argparse
import time

import numpy as np

import dptrain as dp
import dptrain.nn.functional as F
from dptrain import backend
from dptrain.scaling.bench import write_results


def step_time(dims, batch, device, repeats):
    xp = backend.xp_for(device)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((batch, dims[0])).astype(np.float32))
    y = xp.asarray(rng.integers(0, dims[-1], batch))
    model = dp.nn.MLP(dims, seed=0)
    if device != "cpu":
        model.to(device)
    opt = dp.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(dp.Tensor(x)), y).backward()
        opt.step()

    sync = (lambda: xp.cuda.Stream.null.synchronize()) if device == "cuda" else (lambda: None)
    for _ in range(5):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/gpu.json")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    if not backend.gpu_available():
        raise SystemExit("bench_gpu.py: cupy with a CUDA GPU is needed")
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    results = {"gpu": props["name"].decode(), "cupy": cupy.__version__, "numpy": np.__version__, "runs": []}
    for dims in ([40, 256, 256, 10], [784, 1024, 1024, 10]):
        for batch in (256, 4096):
            cpu = step_time(dims, batch, "cpu", max(5, args.repeats // 3))
            gpu = step_time(dims, batch, "cuda", args.repeats)
            run = {"mlp": "-".join(map(str, dims)), "batch": batch, "cpu_ms": cpu, "gpu_ms": gpu, "speedup": cpu / gpu}
            results["runs"].append(run)
            print(f"{run['mlp']:>18} batch {batch:5d}: numpy {cpu:8.2f} ms | cupy {gpu:7.2f} ms | "
                  f"{cpu / gpu:6.1f}x", flush=True)
    write_results(args.out, results)


if __name__ == "__main__":
    main()
