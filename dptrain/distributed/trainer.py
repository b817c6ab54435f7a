"""Trainer: the driver of synchronous data-parallel training.

The driver never touches gradients. It places the actors, connects their
transport (shared memory on the server's node, Ray's object store elsewhere),
then asks the server for chunks of steps, `ps.run_steps.remote(first, n)`, and
blocks only to read each chunk's metrics, with the next chunk already queued.
The server runs each step as a fan-out and fan-in:

    results = ray.get([w.compute_gradients.remote(params, step) for w in workers])
    params = apply_gradients(step, *results)

(workers on its node that share memory get the step number over a Unix socket
instead of a Ray call: control.py). Measured on a 2-core machine, a step chained
through the driver (worker calls, then a server call, each waiting on the other
through the driver) costs 3.2 ms of Ray overhead with no work at all; the
server's own fan-out costs one round trip, about 1.2 ms, and a socket message
tens of microseconds. The steps and their numbers are the same either way.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import time

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ..config import ConfigError, TrainConfig
from ..data import BatchSampler, Dataset
from ..loop import (MetricsLog, TrainResult, epoch_record, load_data, prepare, reached_target, summary_record,
                    total_steps)
from .. import checkpoint
from ..models import first_difference, layout, user_modules
from ..tensor import as_dtype
from .actors import NonFiniteError, ParameterServer, Worker, WorkerError, WorkerLost
from . import shm
from .cluster import check_resources, connect, embedded_cpus, head_node_id

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # actors (and placement groups) that cannot start within this are an error
WAIT_NOTICE_S = 5.0  # after this long waiting for them, say so


class TrainingError(RuntimeError):
    """Training stopped: a worker or the server failed. The message names which and at what step."""


class ServerLost(RuntimeError):
    """The parameter-server actor died; a new one restarts from the newest checkpoint."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"parameter server lost around step {step}: {reason}")


def prepare_dataset(dataset: Dataset, dtype: str) -> Dataset:
    """The dataset in the training dtype, so workers can use the shared arrays without a copy."""
    dt = as_dtype(dtype)

    def cast(a):
        return a if a.dtype.kind in "iu" else np.ascontiguousarray(a, dtype=dt)
    return dataclasses.replace(dataset, x_train=cast(dataset.x_train), y_train=cast(dataset.y_train),
                               x_test=cast(dataset.x_test), y_test=cast(dataset.y_test))


def run_key(out: str | None) -> str:
    """A short name for a run's shared-memory segments: fixed by its output folder, so a
    resumed run can remove what a killed one left; random without one."""
    import hashlib
    import uuid
    if out:
        return hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:8]
    return uuid.uuid4().hex[:8]


def _unwrap(error: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (a task error inside a dependency's error)."""
    seen = 0
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) is not None and seen < 10:
        error, seen = error.cause, seen + 1
    return error


class Trainer:
    """`Trainer(TrainConfig(...)).fit()` trains on Ray and returns a TrainResult.

    `model`, a callable returning a dp.nn.Module, and `loss`, a name or a callable
    (output, target) -> the loss SUM, override cfg.model and cfg.loss (dptrain.models
    says what they may be). The builder runs on the server (whose parameters are the
    initial ones) and on every worker; a function from the user's script or from a
    `file.py:function` reference is shipped by value, so its file need not exist on
    the cluster's other machines. Before any actor starts, the model and the loss run
    once on the CPU on two examples (models.check): mistakes are a ConfigError.
    `sink` receives every metrics record (the CLI writes them to metrics.jsonl);
    `progress(step, record)` is called after each step's metrics arrive;
    `faults` injects failures into workers and the server (tests and scripts/soak.py);
    `resume` continues from the newest checkpoint in <config.out>/checkpoints.
    """

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None, sink=None, progress=None,
                 faults: list | None = None, resume: bool = False, *, model=None, loss=None, on_start=None,
                 resume_at_most: int | None = None):
        self.cfg = config
        self.model, self.loss = model, loss
        self.on_start = on_start  # called once the actors are up, before step 0 (the CLI makes the run folder)
        self.resume_at_most = resume_at_most  # resume from a checkpoint of at most this step (the last one logged)
        self._submitted = -1  # the last step handed to the server (fault injection bookkeeping)
        self.resume = resume  # continue from the newest checkpoint in <out>/checkpoints
        self.faults = faults  # fault injection (tests, scripts/soak.py): see actors.inject_fault
        self.dataset = dataset
        self.sink = sink
        self.progress = progress
        self.placement: list = []  # where each worker ran (filled by fit)
        self.shared: list = []  # ranks of the workers that used shared memory
        self._segments: set = set()  # names of every shared-memory segment of this run

    # ------------------------------------------------------------------ actors

    def _spawn_worker(self, rank: int, num_workers: int, pg=None, faults=None):
        cfg = self.cfg
        opts = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        return ray.remote(Worker).options(**opts).remote(cfg.to_dict(), self._factory, self._loss_fn, self._data_ref,
                                                         rank, num_workers, faults)

    def _spawn_server(self, faults=None):
        opts = {"num_cpus": 0}
        head = head_node_id()
        if head is not None:  # next to the driver on the (live) head node; it needs no CPU, so it always fits.
            # Not soft: Ray then placed it on a worker node now and then, and that node's loss took it along.
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=False)
        return ray.remote(ParameterServer).options(**opts).remote(self.cfg.to_dict(), self._factory, self._steps,
                                                                  faults)

    def _spawn(self, data_ref, steps: int):
        cfg = self.cfg
        self._data_ref, self._steps = data_ref, steps
        pg = None
        if cfg.spread:
            bundle = {"CPU": max(cfg.cpus_per_worker, 0.01)}
            if cfg.gpus_per_worker:
                bundle["GPU"] = cfg.gpus_per_worker
            pg = placement_group([dict(bundle) for _ in range(cfg.workers)], strategy="SPREAD")
            try:
                ready, _ = ray.wait([pg.ready()], timeout=WAIT_NOTICE_S)
                if not ready:
                    log.warning("waiting for the cluster to reserve %d x %s across its nodes; giving up after %.0f s",
                                cfg.workers, bundle, READY_TIMEOUT_S)
                ray.get(pg.ready(), timeout=READY_TIMEOUT_S - WAIT_NOTICE_S)
            except ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                raise TrainingError(f"could not reserve {cfg.workers} x {bundle} across the cluster's nodes "
                                    f"within {READY_TIMEOUT_S:.0f} s (its resources are taken?)") from None
        workers = [self._spawn_worker(rank, cfg.workers, pg, self.faults) for rank in range(cfg.workers)]
        ps = self._spawn_server(self.faults)
        return ps, workers, pg

    def _connect_transport(self, ps, workers, ranks=None) -> list:
        """Shared memory for CPU workers on the server's node (transport "auto"); returns their ranks.

        Everything else reads parameters and returns gradients through Ray's object store.
        `ranks` limits the work to some workers (a replacement); the others keep their setup.
        """
        ps_node = ray.get(ps.node_id.remote())
        todo = range(len(workers)) if ranks is None else ranks
        local = [r for r in todo if self.placement[r]["node_id"] == ps_node and self.placement[r]["device"] == "cpu"]
        shared = [r for r in self.shared if ranks is not None and r not in ranks and r < len(workers)]
        if ranks is None:  # a new server: workers that shared memory with the old one on another node go back
            moved = [r for r in self.shared if r < len(workers) and r not in local]  # to the object store
            if moved:
                log.info("parameter server now on another node than worker(s) %s: they use the object store", moved)
                for r in moved:
                    self._from_worker(r, workers[r].close.remote())
        if self.cfg.transport == "auto" and local:
            try:
                segment = ray.get(ps.enable_shared_memory.remote(self._run_key))
                self._segments.add(segment)
                for rank in local:
                    grad_segment = self._from_worker(rank, workers[rank].use_shared_memory.remote(segment,
                                                                                                 self._run_key))
                    self._segments.add(grad_segment)
                    ray.get(ps.register_shared_worker.remote(rank, grad_segment))
                    shared.append(rank)
            except ray.exceptions.RayTaskError as e:  # no space in /dev/shm, say
                raise TrainingError(f"could not set up shared memory: {_unwrap(e)} "
                                    "(rerun with --transport object_store)") from None
        ray.get(ps.set_publish.remote(len(shared) < len(workers)))
        return sorted(shared)

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
    def _wait_ready(ps, workers) -> tuple:
        refs = [w.ready.remote() for w in workers]
        ps_ref = ps.node_id.remote()  # any small call: the server has started once it answers
        everything = refs + [ps_ref]
        ready, pending = ray.wait(everything, num_returns=len(everything), timeout=WAIT_NOTICE_S)
        if pending:  # a busy cluster: say so while waiting
            log.warning("waiting for the cluster to start %d of %d actors (its resources are taken?); giving up "
                        "after %.0f s", len(pending), len(everything), READY_TIMEOUT_S)
            ready, pending = ray.wait(everything, num_returns=len(everything), timeout=READY_TIMEOUT_S - WAIT_NOTICE_S)
        if pending:
            names = [f"worker {refs.index(r)}" if r in refs else "parameter server" for r in pending]
            raise TrainingError(f"{', '.join(names)} did not start within {READY_TIMEOUT_S:.0f} s: the cluster "
                                "has no free resources for them (cluster/status.sh shows what is running)")
        try:
            placement = ray.get(refs)
        except ray.exceptions.RayError as e:
            raise TrainingError(f"a worker failed to start: {_unwrap(e)}") from None
        server = ray.get(ps.get_layout.remote())
        for rank, theirs in enumerate(ray.get([w.layout.remote() for w in workers])):
            diff = first_difference(server, theirs)
            if diff is not None:
                raise ConfigError(f"invalid model: worker {rank} built another model than the server ({diff}, the "
                                  "server's first): the builder must give the same names and shapes every time",
                                  field="model")
        return placement, server

    # ------------------------------------------------------------------ fit

    def fit(self) -> TrainResult:
        with self.started() as (dataset, steps):
            return self._run(dataset, steps)

    @contextlib.contextmanager
    def started(self):
        """The run's actors, started and connected; stopped and cleaned up on exit. Yields
        (dataset, total steps). `fit` trains inside it; `run_block` drives steps in it."""
        cfg = self.cfg
        dataset = self.dataset if self.dataset is not None else load_data(cfg)  # bad data fails before Ray starts
        # so does a bad model or loss, and a GPU run on an embedded Ray (this machine's GPUs) without a GPU
        self._factory, self._loss_fn = prepare(cfg, dataset, self.model, self.loss,
                                               gpus_on_cluster=bool(cfg.address or os.environ.get("RAY_ADDRESS")))
        steps = total_steps(cfg, len(dataset))
        folder = os.path.join(cfg.out, "checkpoints") if cfg.out else None
        if folder and self.resume:  # and a resume of a checkpoint of another model or run
            try:
                checkpoint.check_run(folder, cfg.to_dict(), layout(self._factory.on("cpu")()), steps,
                                     self.resume_at_most)
            except checkpoint.CheckpointError as e:
                raise ConfigError(f"invalid resume: {e}", field="resume") from None
        elif folder and checkpoint.list_checkpoints(folder):  # a new run must not restore an old one's
            raise ConfigError(f"invalid out: {cfg.out} holds the checkpoints of another run: resume it, or give "
                              "another out for a new run", field="out")
        self._steps_per_epoch = BatchSampler(len(dataset), cfg.batch_size).steps_per_epoch
        started = connect(cfg.address,
                          num_cpus=embedded_cpus(cfg.workers, cfg.cpus_per_worker, cfg.cpus),
                          num_gpus=None)
        self._ps, self._workers, pg = None, [], None
        self._pg = None
        self._run_key = run_key(cfg.out)
        if cfg.out:  # segments left in this node's /dev/shm by an earlier, killed run of this folder
            for name in shm.names(f"dptrain-{self._run_key}-"):
                shm.unlink(name)
        orphans = shm.sweep_orphans()  # and by any killed run: segments no living process maps
        if orphans:
            log.info("removed %d shared-memory segment(s) that killed runs left in /dev/shm", len(orphans))
        for module in user_modules(self._factory.builder, self._loss_fn):  # their files may exist here only
            ray.cloudpickle.register_pickle_by_value(module)
        try:
            check_resources(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)
            data_ref = ray.put(prepare_dataset(dataset, cfg.dtype))
            self._ps, self._workers, pg = self._spawn(data_ref, steps)
            self._pg = pg
            self.placement, model_layout = self._wait_ready(self._ps, self._workers)
            if self.resume:
                self._restore(self._ps, required=True, max_step=self.resume_at_most)
            try:
                self.shared = self._connect_transport(self._ps, self._workers)
            except WorkerLost as e:
                raise TrainingError(f"{e} while the run was starting") from None
            log.info("training %s on %d worker(s) across %d node(s) (%d through shared memory): model %s "
                     "(%s parameters), %d steps, global batch %d", dataset.name, cfg.workers,
                     len({p["node_id"] for p in self.placement}), len(self.shared), self._factory.name,
                     f"{sum(int(np.prod(p[1])) for p in model_layout):,}", steps,
                     min(cfg.batch_size, len(dataset)))
            ray.get(self._ps.set_workers.remote(self._workers, self._steps_per_epoch, steps))
            if self.on_start is not None:
                self.on_start()
            yield dataset, steps
        finally:
            self._close(self._workers + ([self._ps] if self._ps is not None else []))
            for name in self._segments:  # what a killed actor could not remove (same node only)
                shm.unlink(name)
            if pg is not None:
                remove_placement_group(pg)
            if started:
                ray.shutdown()

    def run_block(self, first: int, count: int) -> list:
        """Inside `started()`: steps first .. first+count-1, as fit runs them but with no log,
        evaluation records or recovery; the server's metrics of each step (step_s, compute_s,
        apply_s, ...). For benchmarks that interleave the trainer with something else."""
        return self._get(self._ps.run_steps.remote(first, count), first, count)

    def _restore(self, ps, required: bool, max_step: int | None = None) -> int:
        """Load the newest intact checkpoint (of at most `max_step` steps) into `ps`; returns its
        step (0: none, start over)."""
        try:
            step = self._get(ps.restore_checkpoint.remote(None, max_step), -1)
        except TrainingError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        if step is None:
            if required:
                folder = f"{self.cfg.out}/checkpoints" if self.cfg.out else "(no --out)"
                raise TrainingError(f"cannot resume: no intact checkpoint in {folder}")
            return 0
        log.info("restored the checkpoint of step %d", step)
        return step

    # ------------------------------------------------------------------ recovery

    def _recover(self, error: "WorkerLost | ServerLost", failures: int, recorded: int) -> int:
        """Replace what was lost; returns the failure count. Raises once the budget is spent."""
        failures += 1
        if failures > self.cfg.max_failures:
            where = f"{self.cfg.out}/checkpoints" if self.cfg.out and self.cfg.checkpoint_every else "none kept"
            raise TrainingError(f"{error}; the failure budget (--max-failures {self.cfg.max_failures}) is spent. "
                                f"Last checkpoint: {where}")
        log.warning("%s; recovering (failure %d of at most %d)", error, failures, self.cfg.max_failures)
        if isinstance(error, ServerLost):
            self._replace_server(recorded)
        elif self.cfg.on_worker_loss == "shrink" and len(self._workers) > 1:
            self._shrink(error.rank)
        else:
            self._replace_worker(error.rank)
        return failures

    def _remaining_faults(self) -> list | None:
        """Injected faults not yet reached: a replacement must not fire the one that killed its predecessor."""
        if not self.faults:
            return None
        return [f for f in self.faults if f["step"] > self._submitted]

    def _replace_worker(self, rank: int) -> None:
        old = self._workers[rank]
        ray.kill(old)
        if rank in self.shared:
            ray.get(self._ps.release_worker.remote(rank))
            self.shared.remove(rank)
        new = self._start_replacement(rank)
        self._workers[rank] = new
        self.shared = self._connect_transport(self._ps, self._workers, ranks=[rank])
        ray.get(self._ps.set_workers.remote(self._workers, self._steps_per_epoch, self._steps))

    def _from_worker(self, rank: int, ref):
        """ray.get of a call to worker `rank` during setup or recovery: a dead or hung worker is
        WorkerLost (recovered like one lost in a step), not an escaping Ray error."""
        try:
            return ray.get(ref, timeout=READY_TIMEOUT_S)
        except ray.exceptions.RayActorError as e:
            raise WorkerLost(rank, self._submitted, f"its process died ({type(e).__name__})") from None
        except ray.exceptions.GetTimeoutError:
            ray.kill(self._workers[rank])
            raise WorkerLost(rank, self._submitted, f"no answer within {READY_TIMEOUT_S:.0f} s") from None

    def _start_replacement(self, rank: int):
        """A new worker `rank`, started and answering (its placement recorded)."""
        new, self.placement[rank] = self._start_actor(
            f"worker {rank}", lambda: self._spawn_worker(rank, len(self._workers), self._pg,
                                                         faults=self._remaining_faults()),
            lambda actor: actor.ready.remote(), "no free resources left? --on-worker-loss shrink goes on without it")
        return new

    def _start_actor(self, what: str, spawn, probe, hint: str = ""):
        """(actor, answer to `probe`) of a replacement actor that started; TrainingError if none can in time.

        A worker goes into the lost one's placement-group bundle (or anywhere, without one), the
        server next to the driver where it can. When a whole node died, Ray may still place the
        replacement there until it has noticed the node's death (missed heartbeats, some seconds)
        and moved the bundle to a live node: such a replacement dies before it runs, and another
        is started, until READY_TIMEOUT_S.
        """
        deadline = time.monotonic() + READY_TIMEOUT_S
        tries = 0
        while True:
            tries += 1
            actor = spawn()
            try:
                return actor, ray.get(probe(actor), timeout=max(deadline - time.monotonic(), 1.0))
            except ray.exceptions.GetTimeoutError:
                ray.kill(actor)
                raise TrainingError(f"no replacement for {what} could start within {READY_TIMEOUT_S:.0f} s"
                                    + (f" ({hint})" if hint else "")) from None
            except ray.exceptions.RayActorError as e:
                ray.kill(actor)
                reason = str(e).split("The actor died because", 1)[-1].splitlines()[0].strip(" .")
                if time.monotonic() + 1.0 > deadline:
                    raise TrainingError(f"no replacement for {what} could start within {READY_TIMEOUT_S:.0f} s "
                                        f"({tries} tries; the last died: {reason})") from None
                log.warning("the replacement for %s died before it ran (%s); trying again", what, reason)
                time.sleep(1.0)

    def _shrink(self, rank: int) -> None:
        """Go on without worker `rank`: the others take its share of every global batch."""
        ray.kill(self._workers.pop(rank))
        self.placement.pop(rank)
        ray.get(self._ps.reset_shared_workers.remote(release=[rank] if rank in self.shared else []))
        n = len(self._workers)
        shared = []
        for new_rank, w in enumerate(self._workers):
            segment = self._from_worker(new_rank, w.set_rank.remote(new_rank, n))
            self.placement[new_rank]["rank"] = new_rank
            if segment is not None:
                ray.get(self._ps.register_shared_worker.remote(new_rank, segment))
                shared.append(new_rank)
        self.shared = shared
        ray.get(self._ps.set_publish.remote(len(shared) < n))
        ray.get(self._ps.set_workers.remote(self._workers, self._steps_per_epoch, self._steps))

    def _replace_server(self, recorded: int) -> None:
        """A new server from the newest checkpoint (or the initial parameters): lost steps are replayed.

        Only checkpoints of at most `recorded` steps qualify: the steps after them are run
        again, so their metrics reach the log even if the old server died before sending them.
        """
        ray.kill(self._ps)
        self._ps, node = self._start_actor("the parameter server", lambda: self._spawn_server(self._remaining_faults()),
                                           lambda actor: actor.node_id.remote())
        log.info("a new parameter server runs on node %s", node[:8])
        self._restore(self._ps, required=False, max_step=recorded)
        self.shared = self._connect_transport(self._ps, self._workers)
        ray.get(self._ps.set_workers.remote(self._workers, self._steps_per_epoch, self._steps))

    # ------------------------------------------------------------------ the loop

    def _run(self, dataset: Dataset, steps: int) -> TrainResult:
        cfg = self.cfg
        steps_per_epoch = self._steps_per_epoch
        mlog = MetricsLog(cfg, steps, workers=len(self._workers), sink=self.sink)
        classification = dataset.task == "classification"
        window: list = []

        def record(chunk: list) -> bool:
            """Log a chunk's step and epoch records; True when the target accuracy is reached."""
            for value in chunk:
                step = value["step"]
                rec = {"step": step, "epoch": step // steps_per_epoch, "loss": value["loss"], "count": value["count"],
                       "lr": value["lr"], "time_s": value["step_s"], "compute_s": value["compute_s"],
                       "apply_s": value["apply_s"]}
                if value.get("skipped"):
                    rec["skipped"] = True
                if classification:
                    rec["correct"] = value["correct"]
                    rec["accuracy"] = value["correct"] / max(value["count"], 1)
                mlog.step(rec)
                window.append(rec)
                if self.progress:
                    self.progress(step, rec)
                if "evaluation" in value and record_epoch(step, value["evaluation"]):
                    return True
            return False

        def record_epoch(step: int, evaluation: dict) -> bool:
            """Log the epoch that ends at `step`; True when the target accuracy is reached."""
            epoch = epoch_record(step // steps_per_epoch, step, window, evaluation)
            mlog.epoch(epoch)
            window.clear()
            return reached_target(cfg, epoch, mlog, time.perf_counter() - start)

        def chunks_from(step):
            """Chunks end at log lines and epoch ends."""
            while step < steps:
                n = min(steps - step, steps_per_epoch - step % steps_per_epoch, cfg.log_every - step % cfg.log_every)
                yield step, n
                step += n

        start = time.perf_counter()
        failures, stop = 0, False
        self._submitted = -1  # the last step handed to the server (fault injection bookkeeping)
        # One chunk is queued ahead of the one the driver waits for, so the server never
        # idles -- unless a target accuracy is set: then each epoch's verdict comes first.
        lookahead = 0 if cfg.target_accuracy is not None else 1
        first = self._get(self._ps.current_step.remote(), -1)
        resumed_from = first
        if first > 0 and self.sink:  # a resumed run: what the killed one logged from here on is run again
            self.sink({"kind": "resume", "resume_step": first})
        while not stop:
            mlog.truncate(first)
            window[:] = [r for r in window if r["step"] < first]
            pending: collections.deque = collections.deque()
            try:
                for begin, n in chunks_from(first):
                    pending.append((begin, n, self._ps.run_steps.remote(begin, n)))
                    self._submitted = max(self._submitted, begin + n - 1)
                    while len(pending) > lookahead and not stop:
                        begin_done, n_done, ref = pending.popleft()
                        stop = record(self._get(ref, begin_done, 2 * n_done))  # it may queue behind one more
                    if stop:
                        break
                while pending and not stop:
                    begin_done, n_done, ref = pending.popleft()
                    stop = record(self._get(ref, begin_done, 2 * n_done))
                break
            except (WorkerLost, ServerLost) as e:
                for _, _, ref in pending:  # chunks queued behind the failure fail fast; wait them out
                    try:
                        ray.get(ref, timeout=60)
                    except Exception:
                        pass
                error = e
                while True:  # recovery may find more lost (a dead node can take the server and workers)
                    try:
                        if isinstance(error, WorkerLost):  # the steps the failed chunk did complete
                            stop = record(self._get(self._ps.take_unreported.remote(), error.step)) or stop
                        failures = self._recover(error, failures,
                                                 recorded=len(mlog.steps) and mlog.steps[-1]["step"] + 1)
                        first = self._get(self._ps.current_step.remote(), -1)
                        if window and first == window[-1]["step"] + 1 and first % steps_per_epoch == 0:
                            # the loss cut an epoch's evaluation short: the server holds its parameters
                            stop = record_epoch(first - 1, self._get(self._ps.evaluate.remote("test"), first)) \
                                or stop
                        break
                    except (WorkerLost, ServerLost) as again:
                        error = again
                if self.sink:
                    self.sink({"kind": "recovery", "error": str(error), "resume_step": first, "failures": failures})
        last = mlog.steps[-1]["step"] if mlog.steps else -1
        wall = time.perf_counter() - start
        if cfg.out:
            self._get(self._ps.save_checkpoint.remote(), last)
        final_train = self._get(self._ps.evaluate.remote("train"), last)
        final_test = self._get(self._ps.evaluate.remote("test"), last)
        summary = summary_record(mlog, wall, final_train, final_test)
        summary["workers"] = len(self._workers)
        summary["nodes"] = len({p["node_id"] for p in self.placement})
        summary["shared_memory_workers"] = len(self.shared)
        summary["failures_survived"] = failures
        if resumed_from > 0:  # the run's steps in all, this session's from resumed_from on
            summary["resumed_from_step"] = resumed_from
            summary["steps"] = last + 1
        state_dict = self._get(self._ps.state_dict.remote(), last)
        return TrainResult(cfg, {"steps": mlog.steps, "epochs": mlog.epochs, "summary": summary,
                                 "placement": self.placement}, state_dict)

    def _get(self, ref, step: int, steps: int = 1):
        """ray.get, with failures turned into WorkerLost / ServerLost (recoverable) or TrainingError.

        No call waits forever: a server call is given `steps` step timeouts (each step's
        own waits are bounded by cfg.step_timeout) plus 10 s; past that the server is
        treated as lost (killed, and replaced from its checkpoint).
        """
        timeout = steps * self.cfg.step_timeout + 10
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            if self._ps is not None:
                ray.kill(self._ps)
            raise ServerLost(step, f"no answer within {timeout:g} s (hung?)") from None
        except ray.exceptions.RayTaskError as e:
            cause = _unwrap(e)
            if isinstance(cause, WorkerLost):
                raise cause from None
            if isinstance(cause, ray.exceptions.RayActorError):
                raise ServerLost(step, str(cause).splitlines()[0]) from None
            if isinstance(cause, (WorkerError, NonFiniteError)):
                raise TrainingError(str(cause)) from None
            raise TrainingError(f"step {step}: {type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayActorError as e:
            raise ServerLost(step, type(e).__name__) from None
