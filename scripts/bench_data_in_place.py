"""Data larger than memory: workers training on a token stream read in place keep a flat memory.

    python scripts/bench_data_in_place.py                  # a 32 GiB token file, 2 workers
    python scripts/bench_data_in_place.py --gib 2 --steps 100

Writes (once) a .bin token stream of --gib GiB of uint16 ids in --dir, larger than this
machine's memory by default, then starts --workers workers on an embedded local Ray, each
given the dataset (its file's name: data.mapped), and runs --steps steps of a small GPT on
them, reading each step's windows from the file (random windows over the whole file: mostly
not in the page cache). Every --every steps it records each worker's unique memory (USS);
then it runs the same steps on an in-memory dataset of the same shape (windows of the same
length, a stream of --memory-mib MiB) and compares the workers' compute time per step.
Printed, and written to benchmarks/data_in_place.json.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import ray

from dptrain.blocks import prepare
from dptrain.config import TrainConfig
from dptrain.data import load_dataset
from dptrain.distributed.messages import Request
from dptrain.distributed.trainer import prepare_dataset
from dptrain.distributed.worker import Worker
from dptrain.scaling.bench import write_results

VOCAB = 256


def write_tokens(path: Path, gib: float) -> None:
    """`gib` GiB of random uint16 ids below VOCAB, written a chunk at a time (kept if present)."""
    size = int(gib * 2**30) // 2 * 2
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rng, chunk = np.random.default_rng(0), 2**27  # 256 MiB of ids per write
    t0 = time.time()
    with open(path.with_suffix(".tmp"), "wb") as f:
        for start in range(0, size // 2, chunk):
            rng.integers(0, VOCAB, min(chunk, size // 2 - start), dtype=np.uint16).tofile(f)
    os.replace(path.with_suffix(".tmp"), path)
    print(f"wrote {path} ({size / 2**30:.1f} GiB) in {time.time() - t0:.0f} s")


def available_memory() -> int:
    """Bytes the kernel could give without swapping (MemAvailable: free memory and page cache it can drop)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run(dataset, cfg: TrainConfig, steps: int, every: int) -> dict:
    """`steps` steps of `cfg.workers` Worker actors on `dataset`: USS every `every` steps, compute ms."""
    ref = ray.put(prepare_dataset(dataset, cfg.dtype))
    factory, loss = prepare(cfg, dataset)
    n = cfg.workers
    actors = [ray.remote(Worker).options(num_cpus=1).remote(cfg.to_dict(), factory, loss, ref, r, n) for r in range(n)]
    try:
        params = ray.put(factory().flat().data)
        uss, compute = [], []
        for step in range(steps):
            replies = ray.get([a.compute.remote(Request(step), params) for a in actors])
            compute.append(max(r[0]["metrics"]["end"] - r[0]["metrics"]["start"] for r in replies) * 1e3)
            if step % every == 0 or step == steps - 1:
                uss.append([step, [m["uss"] / 2**20 for m in ray.get([a.memory.remote() for a in actors])]])
        return {"uss_mib": uss, "compute_ms_median": float(np.median(compute[1:])),
                "compute_ms_p90": float(np.percentile(compute[1:], 90))}
    finally:
        for a in actors:
            ray.kill(a)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=32.0, help="size of the token file in GiB")
    ap.add_argument("--dir", default="/tmp/dptrain-bench-tokens", help="where the token file is written")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50, help="record memory every this many steps")
    ap.add_argument("--memory-mib", type=float, default=0.5, help="the in-memory stream compared with")
    ap.add_argument("--out", default="benchmarks/data_in_place.json")
    args = ap.parse_args(argv)
    for name in ("gib", "workers", "steps", "every", "memory_mib"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    big = Path(args.dir) / "tokens.bin"
    write_tokens(big, args.gib)
    small = Path(args.dir) / "small.bin"
    write_tokens(small, args.memory_mib / 1024)
    cfg = TrainConfig(data=str(big), seq_len=64, vocab_size=VOCAB, model="gpt", n_layer=2, n_head=2, n_embd=64,
                      batch_size=64, workers=args.workers, dtype="float32", seed=0)
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="warning")
    try:
        t0 = time.time()
        in_place = load_dataset(path=str(big), seq_len=cfg.seq_len, vocab_size=VOCAB)  # one pass checks the ids
        check_s = time.time() - t0
        memory = load_dataset(path=str(small), seq_len=cfg.seq_len, vocab_size=VOCAB)
        memory = type(memory)(**{**memory.__dict__, "x_train": memory.x_train[:], "y_train": memory.y_train[:],
                                 "x_test": memory.x_test[:], "y_test": memory.y_test[:], "files": None})
        free = available_memory()
        results = {"command": f"python scripts/bench_data_in_place.py --gib {args.gib:g} --workers {args.workers} "
                              f"--steps {args.steps}",
                   "file_gib": big.stat().st_size / 2**30, "machine_memory_gib": os.sysconf("SC_PHYS_PAGES")
                   * os.sysconf("SC_PAGE_SIZE") / 2**30, "available_memory_gib_at_start": free / 2**30,
                   "check_s": check_s, "windows": len(in_place), "in_place": run(in_place, cfg, args.steps, args.every),
                   "in_memory": run(memory, cfg.replace(data=str(small)), args.steps, args.every)}
    finally:
        ray.shutdown()
    a, b = results["in_place"], results["in_memory"]
    print(f"token file {results['file_gib']:.1f} GiB ({results['windows']:,} windows) on a machine of "
          f"{results['machine_memory_gib']:.1f} GiB ({free / 2**30:.1f} available: "
          f"{results['file_gib'] / (free / 2**30 / args.workers):.1f}x that per worker); "
          f"the driver's check of every id took {check_s:.0f} s")
    for label, r in (("in place", a), ("in memory", b)):
        first, last = r["uss_mib"][0][1], r["uss_mib"][-1][1]
        print(f"{label:>9}: worker USS at step 0 " + ", ".join(f"{u:.0f}" for u in first) + " MiB, at the end "
              + ", ".join(f"{u:.0f}" for u in last) + f" MiB; compute {r['compute_ms_median']:.2f} ms a step "
              f"(p90 {r['compute_ms_p90']:.2f})")
    print(f"in place / in memory compute time: {a['compute_ms_median'] / b['compute_ms_median']:.2f}x")
    write_results(args.out, results)


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
