"""The parameter server's update against this machine's memory floor, with 1 and T threads.

    dptrain bench --update                      # 1.86 M and 20 M parameters, 1 and 2 threads
    python scripts/bench_update.py --sizes 1863690 --threads 1,2,4

For SGD, SGD with momentum, Adam and AdamW: the server's whole update of a step
(`step.apply_mean_gradient`: the mean of N workers' gradients, block by block, and the
optimizer's rule) at each size and thread count, the median of --repeats (after a warm-up),
interleaved so that a slow moment of the machine hits every setting alike. Beside it, the
floor: a STREAM-like pass over the same bytes with the same number of threads, each thread
adding arrays in place over its own range (the bytes the update must move: every operand read
once, every result written once). The ratio update / floor says how far the update is from
what memory allows. Printed, and written to benchmarks/update.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import numpy as np

# bytes per parameter the update moves through memory (float32: 4 per array), N workers' gradients:
# read the N gradients, write the mean; read and write the parameter and each state array
STATE_ARRAYS = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}
SETTINGS = {"sgd": {"optimizer": "sgd", "lr": 0.1}, "sgd-momentum": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
            "adam": {"optimizer": "adam", "lr": 1e-3}, "adamw": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1}}


def bytes_moved(name: str, size: int, workers: int, itemsize: int = 4) -> int:
    """The update's traffic: N gradients read, the mean written, the parameter and the state read and written."""
    return size * itemsize * (workers + 1 + 2 * (1 + STATE_ARRAYS[name]))


def floor_pass(size: int, reads: int, writes: int, threads: int, repeats: int) -> float:
    """Seconds of the fastest of `repeats` passes that read `reads` and write `writes` arrays of
    `size` float32s, split over `threads` threads by range (np.add in place: numpy lets go of the GIL)."""
    adds = min(reads - writes, writes)  # a += b: two reads, one write; a *= c: one of each; sums: a read
    scales, sums = writes - adds, reads - writes - adds
    arrays = [np.ones(size, np.float32) for _ in range(2 * adds + scales + sums)]
    cuts = [size * j // threads for j in range(threads + 1)]

    def part(j):
        lo, hi = cuts[j], cuts[j + 1]
        k = 0
        for _ in range(adds):
            np.add(arrays[k][lo:hi], arrays[k + 1][lo:hi], out=arrays[k][lo:hi])
            k += 2
        for _ in range(scales):
            np.multiply(arrays[k][lo:hi], np.float32(1.0), out=arrays[k][lo:hi])
            k += 1
        for _ in range(sums):
            float(arrays[k][lo:hi].sum())
            k += 1
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    try:
        best = float("inf")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            list(pool.map(part, range(threads)))
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        pool.shutdown()


def update_time(name: str, size: int, workers: int, threads: int, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of the server's update at `threads`, and the parameters it ends on."""
    from ..blocks import build_optimizer
    from ..config import TrainConfig
    from ..nn.module import Parameter
    from ..optim import kernels
    from ..step import apply_mean_gradient
    cfg = TrainConfig(dataset="moons", update_threads=threads, **SETTINGS[name])
    opt = build_optimizer(cfg, [Parameter(np.random.default_rng(0).standard_normal(size).astype(np.float32))])
    grads = [np.random.default_rng(1 + r).standard_normal(opt.flat.size).astype(np.float32) for r in range(workers)]
    kernels.wait()
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        apply_mean_gradient(opt, grads, 256, 1e-3)
        if i >= 2:  # the first steps allocate the state and fault its pages in
            times.append(time.perf_counter() - t0)
    return float(np.median(times)), opt.flat.data


def main(argv=None) -> int:
    from .bench import write_results
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1863690,20000000", help="parameter counts, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts to compare")
    ap.add_argument("--workers", type=int, default=2, help="workers' gradients the update averages")
    ap.add_argument("--repeats", type=int, default=100, help="updates timed per row (their median)")
    ap.add_argument("--optimizers", default=",".join(SETTINGS))
    ap.add_argument("--out", default="benchmarks/update.json")
    args = ap.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
        names = args.optimizers.split(",")
    except ValueError as e:
        ap.error(f"--sizes and --threads take whole numbers, comma-separated ({e})")
    if any(s < 1 for s in sizes) or any(t < 1 for t in threads) or args.workers < 1 or args.repeats < 1:
        ap.error("--sizes, --threads, --workers and --repeats must be >= 1")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"--optimizers: unknown {unknown}; known: {','.join(SETTINGS)}")
    rows = []
    for size in sizes:
        for name in names:
            reads, writes = args.workers + 1 + STATE_ARRAYS[name], 2 + STATE_ARRAYS[name]
            timings: dict = {t: [] for t in threads}
            params = {}
            for _ in range(2):  # interleaved: each thread count twice
                for t in threads:
                    s, p = update_time(name, size, args.workers, t, args.repeats // 2 or 1)
                    timings[t].append(s)
                    params[t] = p
            same = all(np.array_equal(params[threads[0]], params[t]) for t in threads)
            for t in threads:
                floor = floor_pass(size, reads, writes, t, 5)
                ms = float(np.median(timings[t])) * 1e3
                rows.append({"optimizer": name, "parameters": size, "threads": t, "update_ms": ms,
                             "floor_ms": floor * 1e3, "ratio": ms / (floor * 1e3),
                             "bytes": bytes_moved(name, size, args.workers),
                             "gb_per_s": bytes_moved(name, size, args.workers) / (ms / 1e3) / 1e9,
                             "bit_for_bit": same})
                print(f"{name:>12} {size:>10,} params, {t} thread(s): update {ms:7.2f} ms, floor {floor * 1e3:7.2f} ms "
                      f"({ms / (floor * 1e3):.2f}x; {rows[-1]['gb_per_s']:.1f} GB/s)" + ("" if same else "  NOT EXACT"))
    write_results(args.out, {"command": "dptrain bench --update " + " ".join(argv or sys.argv[1:]),
                             "cpus": os.cpu_count(), "workers": args.workers, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
