"""Trainer: the driver of synchronous data-parallel training.

The driver never touches gradients. Per step it chains futures,

    results = [w.compute_gradients.remote(params, step) for w in workers]
    params, metrics = ps.apply_gradients.remote(step, *results)

and blocks only to read a step's metrics, two steps behind, so the next step
is always queued before the driver waits. The parameters are one object per
step in Ray's object store, read by every worker.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ..config import TrainConfig
from ..data import BatchSampler, Dataset
from ..loop import MetricsLog, TrainResult, epoch_record, load_data, model_dims, summary_record, total_steps
from ..tensor import as_dtype
from .actors import ParameterServer, Worker, WorkerError
from .cluster import ClusterError, check_resources, connect, embedded_cpus, head_node_id

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # actors (and placement groups) that cannot start within this are an error
IN_FLIGHT = 2  # steps queued ahead of the metrics the driver waits for


class TrainingError(RuntimeError):
    """Training stopped: a worker or the server failed. The message names which and at what step."""


def prepare_dataset(dataset: Dataset, dtype: str) -> Dataset:
    """The dataset in the training dtype, so workers can use the shared arrays without a copy."""
    dt = as_dtype(dtype)

    def cast(a):
        return a if a.dtype.kind in "iu" else np.ascontiguousarray(a, dtype=dt)
    return dataclasses.replace(dataset, x_train=cast(dataset.x_train), y_train=cast(dataset.y_train),
                               x_test=cast(dataset.x_test), y_test=cast(dataset.y_test))


def _unwrap(error: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (a task error inside a dependency's error)."""
    seen = 0
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) is not None and seen < 10:
        error, seen = error.cause, seen + 1
    return error


class Trainer:
    """`Trainer(TrainConfig(...)).fit()` trains on Ray and returns a TrainResult.

    `sink` receives every metrics record (the CLI writes them to metrics.jsonl);
    `progress(step, record)` is called after each step's metrics arrive;
    `faults` injects failures into workers (tests and scripts/soak.py).
    """

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None, sink=None, progress=None,
                 faults: list | None = None):
        self.cfg = config
        self.faults = faults  # fault injection (tests, scripts/soak.py): see actors.inject_fault
        self.dataset = dataset
        self.sink = sink
        self.progress = progress
        self.placement: list = []  # where each worker ran (filled by fit)

    # ------------------------------------------------------------------ actors

    def _spawn(self, dims: list, data_ref, steps: int):
        cfg = self.cfg
        config = cfg.to_dict()
        worker_res = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker}
        pg = None
        if cfg.spread:
            bundle = {"CPU": max(cfg.cpus_per_worker, 0.01)}
            if cfg.gpus_per_worker:
                bundle["GPU"] = cfg.gpus_per_worker
            pg = placement_group([dict(bundle) for _ in range(cfg.workers)], strategy="SPREAD")
            try:
                ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                raise ClusterError(f"could not reserve {cfg.workers} x {bundle} across the cluster's nodes "
                                   f"within {READY_TIMEOUT_S:.0f} s") from None
        workers = []
        for rank in range(cfg.workers):
            opts = dict(worker_res)
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
            workers.append(ray.remote(Worker).options(**opts).remote(config, dims, data_ref, rank, cfg.workers,
                                                                      self.faults))
        ps_opts = {"num_cpus": 0}
        head = head_node_id()
        if head is not None:  # next to the driver on the head node, unless it cannot fit there
            ps_opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
        ps = ray.remote(ParameterServer).options(**ps_opts).remote(config, dims, steps)
        return ps, workers, pg

    @staticmethod
    def _wait_ready(ps, workers) -> list:
        refs = [w.ready.remote() for w in workers]
        ps_ref = ps.get_weights.remote()
        ready, pending = ray.wait(refs + [ps_ref], num_returns=len(refs) + 1, timeout=READY_TIMEOUT_S)
        if pending:
            names = [f"worker {refs.index(r)}" if r in refs else "parameter server" for r in pending]
            raise ClusterError(f"{', '.join(names)} did not start within {READY_TIMEOUT_S:.0f} s "
                               "(not enough free resources in the cluster?)")
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as e:
            raise TrainingError(f"a worker failed to start: {_unwrap(e)}") from None

    # ------------------------------------------------------------------ fit

    def fit(self) -> TrainResult:
        cfg = self.cfg
        dataset = self.dataset if self.dataset is not None else load_data(cfg)  # bad data fails before Ray starts
        dims = model_dims(cfg, dataset)
        steps = total_steps(cfg, len(dataset))
        steps_per_epoch = BatchSampler(len(dataset), cfg.batch_size).steps_per_epoch
        started = connect(cfg.address,
                          num_cpus=embedded_cpus(cfg.workers, cfg.cpus_per_worker, cfg.cpus),
                          num_gpus=None)
        ps = workers = pg = None
        try:
            check_resources(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)
            data_ref = ray.put(prepare_dataset(dataset, cfg.dtype))
            ps, workers, pg = self._spawn(dims, data_ref, steps)
            self.placement = self._wait_ready(ps, workers)
            log.info("training %s on %d worker(s) across %d node(s): model %s, %d steps, global batch %d",
                     dataset.name, cfg.workers, len({p["node_id"] for p in self.placement}),
                     "-".join(map(str, dims)), steps, cfg.batch_size)
            return self._run(ps, workers, dataset, steps, steps_per_epoch)
        finally:
            for actor in (workers or []) + ([ps] if ps is not None else []):
                ray.kill(actor)
            if pg is not None:
                remove_placement_group(pg)
            if started:
                ray.shutdown()

    def _run(self, ps, workers, dataset: Dataset, steps: int, steps_per_epoch: int) -> TrainResult:
        cfg = self.cfg
        mlog = MetricsLog(cfg, steps, workers=len(workers), sink=self.sink)
        classification = dataset.task == "classification"
        queue: collections.deque = collections.deque()
        window: list = []

        def consume():
            kind, step, ref = queue.popleft()
            value = self._get(ref, step)
            if kind == "eval":
                mlog.epoch(epoch_record(step // steps_per_epoch, step, window, value))
                window.clear()
                return
            rec = {"step": step, "epoch": step // steps_per_epoch, "loss": value["loss"], "count": value["count"],
                   "lr": value["lr"], "time_s": value["step_s"], "compute_s": value["compute_s"],
                   "apply_s": value["apply_s"]}
            if classification:
                rec["correct"] = value["correct"]
                rec["accuracy"] = value["correct"] / max(value["count"], 1)
            mlog.step(rec)
            window.append(rec)
            if self.progress:
                self.progress(step, rec)

        start = time.perf_counter()
        params = ps.get_weights.remote()
        for step in range(steps):
            results = [w.compute_gradients.remote(params, step) for w in workers]
            params, metrics = ps.apply_gradients.options(num_returns=2).remote(step, *results)
            queue.append(("step", step, metrics))
            if (step + 1) % steps_per_epoch == 0 or step + 1 == steps:
                queue.append(("eval", step, workers[0].evaluate.remote(params, "test")))
            while len(queue) > IN_FLIGHT:
                consume()
        while queue:
            consume()
        wall = time.perf_counter() - start
        final_train = self._get(workers[0].evaluate.remote(params, "train"), steps - 1)
        final_test = self._get(workers[0].evaluate.remote(params, "test"), steps - 1)
        summary = summary_record(mlog, wall, final_train, final_test)
        summary["workers"] = len(workers)
        summary["nodes"] = len({p["node_id"] for p in self.placement})
        state_dict = self._get(ps.state_dict.remote(), steps - 1)
        return TrainResult(cfg, {"steps": mlog.steps, "epochs": mlog.epochs, "summary": summary,
                                 "placement": self.placement}, state_dict)

    @staticmethod
    def _get(ref, step: int):
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = _unwrap(e)
            if isinstance(cause, WorkerError):
                raise TrainingError(str(cause)) from None
            raise TrainingError(f"step {step}: {type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayActorError as e:
            raise TrainingError(f"an actor died around step {step}: {e}") from None
