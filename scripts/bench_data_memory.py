"""Memory of N workers holding one dataset: the arrays live once per node, in Ray's object store.

    python scripts/bench_data_memory.py                  # 64 MB of features, 1 and 4 workers
    python scripts/bench_data_memory.py --mb 16 --workers 1,2

For each worker count it starts the workers on an embedded local Ray, lets each
run one step, and reports every worker's unique memory (USS: pages only that
process holds) next to the dataset's size. A worker that copied the data would
show a USS above the dataset size; sharing keeps it near the empty-worker level.
Results are printed and written to benchmarks/data_memory.json.
"""

import argparse
import os

import numpy as np
import ray

from dptrain.scaling.bench import write_results
from dptrain.config import TrainConfig
from dptrain.data import Dataset
from dptrain.distributed.messages import Request
from dptrain.distributed.worker import Worker
from dptrain.distributed.trainer import prepare_dataset
from dptrain.blocks import prepare


def synthetic(mb: float, features: int = 64, seed: int = 0) -> Dataset:
    rows = int(mb * 2**20 / (4 * features))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return Dataset("synthetic", x, y, x[:1000], y[:1000], "classification")


def measure(dataset: Dataset, workers: int) -> list:
    """USS/RSS of each of `workers` workers after one step, sharing one put of `dataset`."""
    cfg = TrainConfig(workers=workers, batch_size=256, model=[dataset.num_features, 32, 2], dtype="float32")
    ref = ray.put(prepare_dataset(dataset, cfg.dtype))
    factory, loss = prepare(cfg, dataset)
    actors = [ray.remote(Worker).options(num_cpus=0).remote(cfg.to_dict(), factory, loss, ref, r, workers)
              for r in range(workers)]
    params = factory().flat().data
    ray.get([a.compute.remote(Request(0), params) for a in actors])
    mem = ray.get([a.memory.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    return mem


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=64, help="size of the feature array in MiB")
    ap.add_argument("--workers", default="1,4", help="worker counts to compare")
    ap.add_argument("--out", default="benchmarks/data_memory.json")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.workers.split(",")]
    ray.init(num_cpus=max(counts), include_dashboard=False, logging_level="warning")
    try:
        ds = synthetic(args.mb)
        results = {"dataset_mib": ds.x_train.nbytes / 2**20, "command": "python scripts/bench_data_memory.py "
                   f"--mb {args.mb:g} --workers {args.workers}", "runs": {}}
        base = measure(synthetic(0.1), 1)[0]
        results["empty_worker_uss_mib"] = base["uss"] / 2**20
        print(f"a worker with a 0.1 MiB dataset: USS {base['uss'] / 2**20:.0f} MiB")
        for n in counts:
            mem = measure(ds, n)
            results["runs"][n] = mem
            uss = [m["uss"] / 2**20 for m in mem]
            print(f"{n} worker(s), dataset {results['dataset_mib']:.0f} MiB: USS per worker "
                  + ", ".join(f"{u:.0f}" for u in uss) + f" MiB; total {sum(uss):.0f} MiB")
    finally:
        ray.shutdown()
    write_results(args.out, results)


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
