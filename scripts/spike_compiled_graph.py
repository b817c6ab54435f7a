"""Ray Compiled Graphs as a transport for dptrain's step, measured against the trainer's own.

    python scripts/spike_compiled_graph.py                       # writes benchmarks/transports.json
    python scripts/spike_compiled_graph.py --steps 100 --out /tmp/t.json

The step is the trainer's own arithmetic (the same Worker and ParameterServer classes,
the same contract): a compiled graph (`ray.dag`, `experimental_compile`) whose input is
the step number, in which the server hands its flat parameters to every worker, each
worker returns its gradient of the loss sum and its metrics, and the server's update
takes them all. Ray moves the values between the actors over its shared-memory
channels; the driver executes the graph once per step. (A compiled graph is executed
from the process that compiled it, so the server cannot drive its own steps in chunks
as it does with the other transports: the driver is in every step's loop.)

For each setting -- the tiny model (moons, 2-8-2, batch 16) at 2 workers, and
784-1024-1024-10 (synthetic, batch 256) at 1 and 2 workers: the `dptrain scale`
floors -- it runs, in one process and one Ray instance, blocks of steps by turns:
the trainer with shared memory and its control channel (transport auto) and the
trainer over the object store; then the compiled graph the same blocks, alone (its
actors poll for input, which would slow the others down). The figure is the median
over blocks of the wall time per step. The compiled graph's final parameters are
compared with the trainer's (the same steps in float32): it carries the step exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ray  # noqa: E402

import dptrain as dp  # noqa: E402
from dptrain.distributed.server import SERVER_OPTIONS, ParameterServer  # noqa: E402
from dptrain.distributed.trainer import prepare_dataset  # noqa: E402
from dptrain.distributed.worker import Worker  # noqa: E402
from dptrain.loop import prepare  # noqa: E402
from dptrain.scaling.hooks import running  # noqa: E402

SETTINGS = [("tiny 2-8-2, 2 workers", "moons", [2, 8, 2], 16, 2),
            ("784-1024-1024-10, 1 worker", "synthetic", [784, 1024, 1024, 10], 256, 1),
            ("784-1024-1024-10, 2 workers", "synthetic", [784, 1024, 1024, 10], 256, 2)]


class GraphWorker(Worker):
    def graph_compute(self, params: np.ndarray, step: int):
        return self.compute_gradients(params, step)


class GraphServer(ParameterServer):
    def graph_params(self, step: int) -> np.ndarray:
        return self.flat.data

    def graph_update(self, step: int, *results) -> dict:
        grads, metrics = zip(*results)
        return self.update(step, list(grads), list(metrics))


class CompiledGraphStep:
    """The step as a compiled graph over a server and `workers` workers."""

    def __init__(self, cfg: dp.TrainConfig, dataset, total_steps: int):
        from ray.dag import InputNode
        factory, loss = prepare(cfg, dataset)
        data_ref = ray.put(prepare_dataset(dataset, cfg.dtype))
        spe = dp.data.BatchSampler(len(dataset), cfg.batch_size).steps_per_epoch
        self.ps = ray.remote(**SERVER_OPTIONS)(GraphServer).options(num_cpus=0).remote(
            cfg.to_dict(), factory, total_steps, spe)
        self.workers = [ray.remote(GraphWorker).options(num_cpus=cfg.cpus_per_worker).remote(
            cfg.to_dict(), factory, loss, data_ref, rank, cfg.workers) for rank in range(cfg.workers)]
        ray.get([w.ready.remote() for w in self.workers] + [self.ps.ready.remote()])
        with InputNode() as step:
            params = self.ps.graph_params.bind(step)
            results = [w.graph_compute.bind(params, step) for w in self.workers]
            out = self.ps.graph_update.bind(step, *results)
        self.dag = out.experimental_compile()

    def run(self, first: int, count: int) -> None:
        for step in range(first, first + count):
            ray.get(self.dag.execute(step))

    def weights(self) -> np.ndarray:
        return ray.get(self.ps.get_weights.remote())

    def close(self) -> None:
        self.dag.teardown()
        for a in self.workers + [self.ps]:
            ray.kill(a)


def measure(name, dataset_name, model, batch, workers, steps, block):
    """Median ms per step of each transport. The trainer's two transports take turns block by
    block; the compiled graph runs the same blocks after them, alone: its actors wait for
    input by polling, which would slow the others down on a small machine."""
    dataset = dp.data.load_dataset(dataset_name)
    total = steps + 10
    base = dp.TrainConfig(dataset=dataset_name, model=model, workers=workers, batch_size=batch, steps=total,
                          lr=0.01, momentum=0.9, seed=0, log_every=10**6)
    blocks = [(first, min(block, 5 + steps - first)) for first in range(5, 5 + steps, block)]
    times = {"shared_memory": [], "object_store": [], "compiled_graph": []}
    with running(dp.Trainer(base, dataset=dataset)) as shared, \
            running(dp.Trainer(base.replace(transport="object_store"), dataset=dataset)) as objects:
        runners = {"shared_memory": shared.run_block, "object_store": objects.run_block}
        for run in runners.values():  # warm-up: first touches of the buffers
            run(0, 5)
        for first, n in blocks:
            for key, run in runners.items():
                t0 = time.perf_counter()
                run(first, n)
                times[key].append(1e3 * (time.perf_counter() - t0) / n)
        trainer_weights = shared.weights()
    graph = CompiledGraphStep(base, dataset, total)
    try:
        graph.run(0, 5)
        for first, n in blocks:
            t0 = time.perf_counter()
            graph.run(first, n)
            times["compiled_graph"].append(1e3 * (time.perf_counter() - t0) / n)
        same = bool(np.array_equal(graph.weights(), trainer_weights))  # the same steps, the same arithmetic
    finally:
        graph.close()
    row = {"setting": name, "workers": workers, "batch": batch, "model": "-".join(map(str, model)),
           "blocks": len(blocks), "block_steps": block, "steps": steps}
    for key, values in times.items():
        row[f"{key}_ms"] = statistics.median(values)
    row["compiled_graph_equals_trainer"] = same
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per repeat (default 200)")
    ap.add_argument("--block", type=int, default=20, help="steps per turn (default 20)")
    ap.add_argument("--out", default="benchmarks/transports.json")
    args = ap.parse_args(argv)
    # logical CPUs for two trainers' workers at once (only one computes at a time)
    ray.init(num_cpus=2 * max(w for *_, w in SETTINGS) + 1, include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        for setting in SETTINGS:
            steps = args.steps if setting[1] == "moons" else max(args.steps // 4, args.block)
            row = measure(*setting, steps, args.block)
            rows.append(row)
            print(f"{row['setting']:<30} shared memory {row['shared_memory_ms']:7.2f} ms | object store "
                  f"{row['object_store_ms']:7.2f} ms | compiled graph {row['compiled_graph_ms']:7.2f} ms"
                  f" | same parameters: {row['compiled_graph_equals_trainer']}", flush=True)
    finally:
        ray.shutdown()
    out = {"command": "python scripts/spike_compiled_graph.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cpus": os.cpu_count(), "ray": ray.__version__, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
