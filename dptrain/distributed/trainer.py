"""Trainer: the driver of synchronous data-parallel training.

The driver never touches gradients. It starts the actors (fleet.py), then asks the
server for chunks of steps, `ps.run_steps.remote(first, n)`, and blocks only to log
each chunk's metrics, with the next chunk already queued; the server runs each step
as a fan-out to its workers and a fan-in into its update, through its transports
(transport/). Measured on a 2-core machine, a step chained through the driver
(worker calls, then a server call, each waiting on the other through the driver)
costs 3.2 ms of Ray overhead with no work at all; the server's own fan-out costs one
round trip, about 1.2 ms, and a control-channel message tens of microseconds. The
steps and their numbers are the same either way. A lost worker or server is
recovered (recovery.py) and the lost steps run again.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import ray

from .. import checkpoint, storage, trackers
from ..callbacks import Callbacks, Progress, RunStart, Sink
from ..config import ConfigError, TrainConfig
from ..data import BatchSampler, Dataset
from ..data.mapped import check_nodes, is_mapped
from ..blocks import as_dataset, prepare, total_steps
from ..metrics import MetricsLog, TrainResult, reached_target, step_record, summary_record
from ..models import layout, user_modules
from ..rundir import RunDir, default_out
from ..tensor import as_dtype
from .cluster import check_resources, connect, embedded_cpus, starts_local
from .errors import ServerLost, TrainingError, WorkerLost
from . import recovery
from .fleet import Fleet
from .transport import shm

log = logging.getLogger(__name__)


def prepare_dataset(dataset: Dataset, dtype: str) -> Dataset:
    """The dataset in the training dtype, so workers can use the shared arrays without a copy."""
    dt = as_dtype(dtype)

    def cast(a):  # a file's rows are cast as they are read (data.mapped)
        return a if a.dtype.kind in "iu" or is_mapped(a) else np.ascontiguousarray(a, dtype=dt)
    return dataclasses.replace(dataset, x_train=cast(dataset.x_train), y_train=cast(dataset.y_train),
                               x_test=cast(dataset.x_test), y_test=cast(dataset.y_test))


def run_key(out: str | None) -> str:
    """A short name for a run's shared-memory segments: fixed by its output folder (or its storage
    URI: a run resumed from the storage has another local folder), so a resumed run can remove
    what a killed one left; random without one."""
    if out:
        return hashlib.sha1((out if "://" in out else os.path.abspath(out)).encode()).hexdigest()[:8]
    return uuid.uuid4().hex[:8]


class Trainer:
    """`Trainer(TrainConfig(...)).fit()` trains on Ray and returns a TrainResult.

    `model`, a callable returning a dp.nn.Module, and `loss`, a name or a callable
    (output, target) -> the loss SUM, override cfg.model and cfg.loss (dptrain.models
    says what they may be). The builder runs on the server (whose parameters are the
    initial ones) and on every worker; a function from the user's script or from a
    `file.py:function` reference is shipped by value, so its file need not exist on
    the cluster's other machines. Before any actor starts, the model and the loss run
    once on the CPU on two examples (models.check): mistakes are a ConfigError.
    With `config.out` the run has a folder (rundir.py), resolved to an absolute path here,
    before anything starts: config.json, metrics.jsonl, summary.json, params.npz and the
    server's checkpoints/, as `dptrain train` writes them.
    `callbacks`, dptrain.Callback instances, are told of the run as it goes (callbacks.py:
    its start, each step and evaluation, replays, its end or failure), after the run folder;
    `sink` receives every metrics record too, and `progress(step, record)` is called after
    each step's metrics arrive (both are callbacks.Sink and callbacks.Progress);
    `faults` injects failures into workers and the server (tests and scripts/soak.py:
    faults.py says how); `resume` continues the run in `config.out` from its newest
    checkpoint of at most the steps its metrics.jsonl holds (or `resume_at_most`, if
    given); `on_start` is called once the actors are up, before step 0.
    """

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None, sink=None, progress=None,
                 faults: list | None = None, resume: bool = False, *, model=None, loss=None, on_start=None,
                 resume_at_most: int | None = None, callbacks: list | None = None):
        if config.storage and not config.out:  # the run folder is written here first, then kept on the storage
            config = config.replace(out=str(Path(tempfile.mkdtemp(prefix="dptrain-run-")) / Path(default_out()).name))
        self.run = RunDir(config.out, append=resume) if config.out else None
        if self.run is not None:  # the actors' working directories are not ours: one absolute path for all
            config = config.replace(out=str(self.run.path))
        self.cfg = config
        self.model, self.loss = model, loss
        self.dataset = dataset
        self.mirror = storage.mirror(config.storage, self.run.path, config.checkpoint_every or 0) if config.storage else None
        self.callbacks = Callbacks(self.run, self.mirror, Progress(progress) if progress else None,
                                   Sink(sink) if sink else None, *trackers.from_config(config), *(callbacks or ()))
        self.on_start = on_start
        self.faults = faults
        self.resume, self.resume_at_most = resume, resume_at_most
        self.fleet: Fleet | None = None
        # what names the run's shared-memory segments (run_key); None: its storage or out folder. A
        # sweep's trial sets it from its folder on the sweep's storage, which the driver sees: Tune
        # runs the trial in a staging folder of its own and copies it there
        self.segment_key: str | None = None
        self.startup: dict = {}  # seconds: ray_init_s, and startup_s, the rest of the way to step 0

    @property
    def placement(self) -> list:
        """Where each worker ran (after fit)."""
        return self.fleet.placement if self.fleet else []

    @property
    def shared(self) -> list:
        """Ranks of the workers that used shared memory (after fit)."""
        return self.fleet.shared if self.fleet else []

    def fit(self) -> TrainResult:
        try:
            with self._session() as (dataset, steps, first):
                result = self._run(dataset, steps, first)
        except BaseException as e:  # a signal too: the run folder is closed, the trackers told
            self.callbacks.on_failure(e)
            raise
        self.callbacks.on_end(result)  # the run folder's summary.json and params.npz first
        return result

    # ------------------------------------------------------------------ setup

    @contextlib.contextmanager
    def _session(self):
        """The run's actors, started and connected, and the callbacks told; stopped and cleaned up
        on exit. Yields (dataset, total steps, the server's step: where this session starts)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        dataset = as_dataset(cfg, self.dataset)  # bad data fails before Ray starts
        if self.run is not None:  # so does an out that cannot be this run's folder
            self.run.check()
            if self.resume and self.resume_at_most is None:  # every step of the run stays logged
                self.resume_at_most = self.run.steps_logged()
        trackers.check(cfg)  # so does a tracker that cannot work, or a storage that cannot be written
        if self.mirror is not None:
            self.mirror.storage.check()
        # so does a bad model or loss, and a GPU run on an embedded Ray (this machine's GPUs) without a GPU
        factory, loss_fn = prepare(cfg, dataset, self.model, self.loss,
                                   gpus_on_cluster=bool(cfg.address or os.environ.get("RAY_ADDRESS")))
        steps = total_steps(cfg, len(dataset))
        self._check_out_folder(layout(factory.on("cpu")()), steps)
        steps_per_epoch = BatchSampler(len(dataset), cfg.batch_size).steps_per_epoch
        cpus = embedded_cpus(cfg.replicas, cfg.cpus_per_worker, cfg.cpus)
        if starts_local(cfg.address):  # a Ray too small for the workers is refused before it starts
            check_resources(cfg.replicas, cfg.cpus_per_worker, 0.0, {"CPU": cpus})
        t1 = time.perf_counter()
        started = connect(cfg.address, num_cpus=cpus, num_gpus=None)
        t2 = time.perf_counter()
        key = self.segment_key or run_key(self.mirror.storage.uri if self.mirror is not None else cfg.out)
        fleet = None
        try:  # from here on, whatever happens (a signal too), what was started is stopped
            _clean_shared_memory(key if cfg.out else None)
            for module in user_modules(factory.builder, loss_fn):  # their files may exist here only
                ray.cloudpickle.register_pickle_by_value(module)
            check_resources(cfg.replicas, cfg.cpus_per_worker, cfg.gpus_per_worker)
            check_nodes(dataset)  # data read in place: every node must see the driver's files
            data_ref = ray.put(prepare_dataset(dataset, cfg.dtype))
            fleet = self.fleet = Fleet(cfg, factory, loss_fn, data_ref, steps, steps_per_epoch, key, self.faults)
            model_layout = fleet.start()
            if self.resume:
                fleet.restore(required=True, max_step=self.resume_at_most)
            try:
                fleet.connect()
            except WorkerLost as e:
                raise TrainingError(f"{e} while the run was starting") from None
            parameters = sum(int(np.prod(p[1])) for p in model_layout)
            log.info("training %s on %d worker(s) across %d node(s) (%d through shared memory): model %s "
                     "(%s parameters), %d steps, global batch %d", dataset.name, cfg.replicas,
                     len({p["node_id"] for p in fleet.placement}), len(fleet.shared), factory.name,
                     f"{parameters:,}", steps, min(cfg.batch_size, len(dataset)))
            if (fleet.shards and len({*fleet.shard_nodes, *(p["node_id"] for p in fleet.placement)}) == 1
                    and len(fleet.shared) < cfg.replicas):
                log.warning("--servers %d: every shard and worker is on one node, but the shards' slices go through "
                            "Ray's object store (--transport %s, --compress %s): on one node the shards read the "
                            "gradients in place only with --transport auto and dense gradients (docs/scaling.md)",
                            len(fleet.shards), cfg.transport, cfg.compress)
            first = fleet.server_step()
            self.callbacks.on_start(RunStart(cfg, dataset.name, steps, steps_per_epoch, cfg.replicas, parameters,
                                             first, tuple(fleet.placement), ray.get_runtime_context().gcs_address,
                                             dataset.vocab))
            if self.on_start is not None:
                self.on_start()
            # startup, reported in the summary: Ray's own start apart from dptrain's
            self.startup = {"ray_init_s": t2 - t1, "startup_s": time.perf_counter() - t0 - (t2 - t1)}
            yield dataset, steps, first
        finally:
            if fleet is not None:
                fleet.stop()
            _unlink_segments(key)  # what a killed actor could not remove (this node)
            if started:
                ray.shutdown()

    def _check_out_folder(self, model_layout: list, steps: int) -> None:
        """A resume must find a checkpoint of this model and run (a new run's folder holds none:
        RunDir.check)."""
        cfg = self.cfg
        if cfg.out and self.resume:
            try:
                checkpoint.check_run(os.path.join(cfg.out, "checkpoints"), cfg.to_dict(), model_layout, steps,
                                     self.resume_at_most)
            except checkpoint.CheckpointError as e:
                raise ConfigError(f"invalid resume: {e}", field="resume") from None

    # ------------------------------------------------------------------ the loop

    def _run(self, dataset: Dataset, steps: int, first: int) -> TrainResult:
        """The steps from `first` on (with recoveries), then the final evaluations and the result."""
        driving = _Driving(self, dataset, steps)
        driving.run(first)
        return self._result(driving, first)

    def _result(self, driving: "_Driving", resumed_from: int) -> TrainResult:
        cfg, fleet, mlog = self.cfg, self.fleet, driving.mlog
        last = mlog.next_step - 1
        wall = time.perf_counter() - driving.start
        if cfg.out:
            fleet.server_call(fleet.ps.save_checkpoint.remote(), last)
        final_train = fleet.server_call(fleet.ps.evaluate.remote("train", True), last)
        final_test = fleet.server_call(fleet.ps.evaluate.remote("test", True), last)
        summary = summary_record(mlog, wall, final_train, final_test)
        summary["workers"] = len(fleet.workers)
        summary["nodes"] = len({p["node_id"] for p in fleet.placement})
        summary["shared_memory_workers"] = len(fleet.shared)
        summary["update_threads"] = fleet.update_threads
        if fleet.shards:
            summary["servers"], summary["server_nodes"] = len(fleet.shards), len(set(fleet.shard_nodes))
        summary["failures_survived"] = driving.failures
        summary.update(self.startup)
        if resumed_from > 0:  # the run's steps in all, this session's from resumed_from on
            summary["resumed_from_step"] = resumed_from
            summary["steps"] = last + 1
        state_dict = fleet.server_call(fleet.ps.state_dict.remote(), last)
        return TrainResult(cfg, {"steps": mlog.steps, "epochs": mlog.epochs, "evaluations": mlog.evaluations,
                                 "summary": summary, "placement": fleet.placement}, state_dict)


class _Driving:
    """The driver's part of the steps: ask the server for chunks, log what comes back, recover
    from losses. Its log (metrics.MetricsLog) owns replay: whatever is run again is rewound
    in it and in the callbacks (the run folder, the caller's) first."""

    def __init__(self, trainer: Trainer, dataset: Dataset, steps: int):
        self.cfg, self.fleet = trainer.cfg, trainer.fleet
        self.steps, self.steps_per_epoch = steps, self.fleet.steps_per_epoch
        self.classification = dataset.task == "classification"
        self.mlog = MetricsLog(self.cfg, steps, workers=len(self.fleet.workers), callbacks=trainer.callbacks)
        self.failures = 0
        self.reached = False  # the target accuracy was reached: no more steps
        self.start = time.perf_counter()

    def run(self, first: int) -> None:
        """Every step from `first` (the server's step) on, recovering from losses."""
        if first > 0:  # a resumed run: what the killed one logged from here on is run again
            self.mlog.rewind(first, {"kind": "resume", "resume_step": first})
        while not self.reached:
            try:
                self._steps_from(first)
                break
            except (WorkerLost, ServerLost) as e:
                first = self._recover(e)

    def _chunks(self, step: int):
        """(first, count) of each chunk from `step` on: chunks end at log lines and epoch ends."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        while step < self.steps:
            n = min(self.steps - step, per_epoch - step % per_epoch, cfg.log_every - step % cfg.log_every)
            yield step, n
            step += n

    def _steps_from(self, first: int) -> None:
        """Queue the server's chunks from `first` on and log each as it comes. One chunk is queued
        ahead of the one waited for, so the server never idles -- unless a target accuracy is
        set: then each epoch's verdict comes first."""
        fleet = self.fleet
        lookahead = 0 if self.cfg.target_accuracy is not None else 1
        pending: collections.deque = collections.deque()
        try:
            for begin, n in self._chunks(first):
                pending.append((begin, fleet.ps.run_steps.remote(begin, n)))
                fleet.submitted = max(fleet.submitted, begin + n - 1)
                while len(pending) > lookahead and not self.reached:
                    self._log_next(pending)  # it may queue behind one more
                if self.reached:
                    return
            while pending and not self.reached:
                self._log_next(pending)
        except (WorkerLost, ServerLost):
            for _, ref in pending:  # chunks queued behind the failure fail fast; wait them out
                try:
                    ray.get(ref, timeout=60)
                except Exception:
                    pass
            raise

    def _log_next(self, pending: collections.deque) -> None:
        begin, ref = pending.popleft()
        self._log(self.fleet.server_call(ref, begin))

    def _log(self, chunk: list) -> None:
        """Log a chunk's step records and the epochs that end in it (until the target is reached)."""
        for value in chunk:
            rec = step_record(value, self.steps_per_epoch, self.classification)
            self.mlog.step(rec)
            if "evaluation" not in value:
                continue
            step = rec["step"]
            if self._ends_epoch(step):
                self._end_epoch(step, value["evaluation"])
                if self.reached:
                    return
            else:  # --eval-every
                self.mlog.evaluation(step, value["evaluation"])

    def _ends_epoch(self, step: int) -> bool:
        """Whether `step` closes an epoch: the epoch's last step, or the run's (a partial epoch)."""
        return (step + 1) % self.steps_per_epoch == 0 or step + 1 == self.steps

    def _end_epoch(self, step: int, evaluation: dict) -> None:
        epoch = self.mlog.end_epoch(step // self.steps_per_epoch, step, evaluation)
        self.reached = reached_target(self.cfg, epoch, self.mlog, time.perf_counter() - self.start)

    def _evaluation_cut_short(self, step: int) -> None:
        """Run the held-out evaluation that should have followed `step` (the last one logged) if the
        loss cut it short: its record arrived without it. The server, at step + 1, holds exactly
        the parameters it was to evaluate."""
        fleet, every = self.fleet, self.cfg.eval_every
        if step < 0:
            return
        if self._ends_epoch(step):
            if self.mlog.epoch_open:
                self._end_epoch(step, fleet.server_call(fleet.ps.evaluate.remote("test"), step + 1))
        elif every and (step + 1) % every == 0 and not (self.mlog.evaluations
                                                        and self.mlog.evaluations[-1]["step"] == step):
            self.mlog.evaluation(step, fleet.server_call(fleet.ps.evaluate.remote("test"), step + 1))

    def _recover(self, error: WorkerLost | ServerLost) -> int:
        """Replace what was lost (recovery.decide says what; a loss found while recovering counts
        too), then rewind the log to the server's step; that step."""
        fleet = self.fleet
        while True:
            try:
                if isinstance(error, WorkerLost):  # the steps the failed chunk did complete
                    self._log(fleet.server_call(fleet.ps.take_unreported.remote(), error.step))
                self.failures += 1  # counted before recovering: a recovery may find more lost
                decision = recovery.decide(error, self.cfg, len(fleet.workers), self.failures)
                log.warning("%s; recovering: %s (failure %d of at most %d)", error, decision.describe(),
                            self.failures, self.cfg.max_failures)
                fleet.recover(decision, recorded=self.mlog.next_step)
                first = fleet.server_step()
                if first == self.mlog.next_step:
                    self._evaluation_cut_short(first - 1)
                break
            except (WorkerLost, ServerLost) as again:
                error = again
        self.mlog.rewind(first, {"kind": "recovery", "error": str(error), "resume_step": first,
                                 "failures": self.failures})
        return first


def _clean_shared_memory(key: str | None) -> None:
    """Remove what killed runs left in this node's /dev/shm: an earlier run of this output
    folder (`key`), and any run's segments that no living process maps."""
    if key:
        _unlink_segments(key)
    orphans = shm.sweep_orphans()
    if orphans:
        log.info("removed %d shared-memory segment(s) that killed runs left in /dev/shm", len(orphans))


def _unlink_segments(key: str) -> None:
    """Remove this node's shared-memory segments of the run `key`."""
    for name in shm.names(f"dptrain-{key}-"):
        shm.unlink(name)
