"""Trainer: the driver of synchronous data-parallel training.

The driver never touches gradients. It places the actors, connects their
transport (shared memory on the server's node, Ray's object store elsewhere),
then asks the server for chunks of steps, `ps.run_steps.remote(first, n)`, and
blocks only to read each chunk's metrics, with the next chunk already queued.
The server runs each step as a fan-out and fan-in:

    results = ray.get([w.compute_gradients.remote(params, step) for w in workers])
    params = apply_gradients(step, *results)

Measured on a 2-core machine, a step chained through the driver (worker calls,
then a server call, each waiting on the other through the driver) costs 4.6 ms
of Ray overhead with no work at all; the server's own fan-out costs one round
trip, about 1.2 ms. The steps and their numbers are the same either way.
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
from ..loop import (MetricsLog, TrainResult, epoch_record, load_data, model_dims, reached_target, summary_record,
                    total_steps)
from ..tensor import as_dtype
from .actors import ParameterServer, Worker, WorkerError
from .cluster import ClusterError, check_resources, connect, embedded_cpus, head_node_id

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # actors (and placement groups) that cannot start within this are an error


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
        self.shared: list = []  # ranks of the workers that used shared memory

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

    def _connect_transport(self, ps, workers) -> list:
        """Shared memory for CPU workers on the server's node (transport "auto"); returns their ranks.

        Everything else reads parameters and returns gradients through Ray's object store.
        """
        ps_node = ray.get(ps.node_id.remote())
        local = [p["rank"] for p in self.placement if p["node_id"] == ps_node and p["device"] == "cpu"]
        shared = []
        if self.cfg.transport == "auto" and local:
            try:
                segment = ray.get(ps.enable_shared_memory.remote())
                for rank in local:
                    grad_segment = ray.get(workers[rank].use_shared_memory.remote(segment))
                    ray.get(ps.register_shared_worker.remote(rank, grad_segment))
                    shared.append(rank)
            except ray.exceptions.RayTaskError as e:  # no space in /dev/shm, say
                raise TrainingError(f"could not set up shared memory: {_unwrap(e)} "
                                    "(rerun with --transport object_store)") from None
        ray.get(ps.set_publish.remote(len(shared) < len(workers)))
        return shared

    @staticmethod
    def _close(actors) -> None:
        """Let actors release their shared-memory segments, then kill them."""
        try:
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10)
        except Exception:  # a dead actor cannot clean up: its process exit unmaps, the owner's close unlinks
            pass
        for actor in actors:
            ray.kill(actor)

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
            self.shared = self._connect_transport(ps, workers)
            log.info("training %s on %d worker(s) across %d node(s) (%d through shared memory): model %s, "
                     "%d steps, global batch %d", dataset.name, cfg.workers,
                     len({p["node_id"] for p in self.placement}), len(self.shared), "-".join(map(str, dims)),
                     steps, cfg.batch_size)
            return self._run(ps, workers, dataset, steps, steps_per_epoch)
        finally:
            self._close((workers or []) + ([ps] if ps is not None else []))
            if pg is not None:
                remove_placement_group(pg)
            if started:
                ray.shutdown()

    def _run(self, ps, workers, dataset: Dataset, steps: int, steps_per_epoch: int) -> TrainResult:
        cfg = self.cfg
        mlog = MetricsLog(cfg, steps, workers=len(workers), sink=self.sink)
        classification = dataset.task == "classification"
        window: list = []
        ray.get(ps.set_workers.remote(workers, steps_per_epoch, steps))

        def record(chunk: list) -> bool:
            """Log a chunk's step and epoch records; True when the target accuracy is reached."""
            for value in chunk:
                step = value["step"]
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
                if "evaluation" in value:
                    epoch = epoch_record(step // steps_per_epoch, step, window, value["evaluation"])
                    mlog.epoch(epoch)
                    window.clear()
                    if reached_target(cfg, epoch, mlog, time.perf_counter() - start):
                        return True
            return False

        # Chunks end at log lines and epoch ends. One chunk is queued ahead of the one the
        # driver waits for, so the server never idles -- unless a target accuracy is set:
        # then each epoch's verdict arrives before the next epoch starts.
        chunks, step = [], 0
        while step < steps:
            to_epoch_end = steps_per_epoch - step % steps_per_epoch
            n = min(steps - step, to_epoch_end, cfg.log_every - step % cfg.log_every)
            chunks.append((step, n))
            step += n
        start = time.perf_counter()
        lookahead = 0 if cfg.target_accuracy is not None else 1
        pending: collections.deque = collections.deque()
        stop = False
        for first, n in chunks:
            pending.append((first, ps.run_steps.remote(first, n)))
            while len(pending) > lookahead and not stop:
                first_done, ref = pending.popleft()
                stop = record(self._get(ref, first_done))
            if stop:
                break
        while pending and not stop:
            first_done, ref = pending.popleft()
            stop = record(self._get(ref, first_done))
        last = mlog.steps[-1]["step"] if mlog.steps else -1
        wall = time.perf_counter() - start
        final_train = self._get(ps.evaluate.remote("train"), last)
        final_test = self._get(ps.evaluate.remote("test"), last)
        summary = summary_record(mlog, wall, final_train, final_test)
        summary["workers"] = len(workers)
        summary["nodes"] = len({p["node_id"] for p in self.placement})
        summary["shared_memory_workers"] = len(self.shared)
        state_dict = self._get(ps.state_dict.remote(), last)
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
