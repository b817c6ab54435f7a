"""The parameter-server actor: the flat parameters, the optimizer, the step loop, checkpoints.

A plain class (Ray makes it remote where it is spawned). It runs the contract's
parts 3 and 4 (step.py): the workers' gradients of loss sums added in rank order,
divided once by the batch's example count, fed to the optimizer block by block in
the same pass. It drives chunks of steps itself (`run_steps`), so a step costs one
fan-out and fan-in, not a round trip through the driver; the workers are reached
only through transports (transport/), which it sets up itself from the driver's list
of workers and where they run (`set_workers`). With --staleness or --backup-workers the
steps run relaxed (relaxed.py), each concluded by the same `conclude`; with --compress
the workers' payloads are decoded and added up in rank order before the update. With
--servers K > 1 the update is the shards' (shards.py): the server passes references.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import ray

from .. import compress
from ..config import TrainConfig
from ..loop import build_optimizer, build_schedule
from ..models import ModelFactory, layout
from ..nn import flatten
from ..step import mean_gradient, step_metrics
from . import transport
from .errors import NonFiniteError
from .relaxed import Relaxed
from .shards import Shards
from .worker import node_id

log = logging.getLogger(__name__)


class ParameterServer:
    """Owns the flat parameters and the optimizer; averages gradients exactly.

    `run_steps(first, n)` runs n steps over the workers given to `set_workers`;
    `update(step, grads, metrics)` is one step's arithmetic; `save_checkpoint` /
    `restore_checkpoint` write and read its full state. Given `watch_name`, a thread of
    its own sends the step loop's progress to the driver's `Watch` every second: how the
    driver tells a hung server from a slow step.
    """

    def __init__(self, config: dict, factory: ModelFactory, total_steps: int, steps_per_epoch: int,
                 run_key: str = "run", watch_name: str | None = None):
        cfg = TrainConfig.from_dict(config)
        self.config = config
        self.checkpoints = os.path.join(cfg.out, "checkpoints") if cfg.out else None
        self._checkpoint_failing = False  # the last checkpoint could not be written (a full disk)
        # the server's arithmetic is a few vector ops over arrays that arrive in host memory: CPU
        self.cfg = cfg.replace(device="cpu", gpus_per_worker=0.0)
        self.model = factory.on("cpu")()  # its parameters are the run's initial ones
        self.layout = layout(self.model)
        self.optimizer = build_optimizer(self.cfg, self.model.parameters())
        self.schedule = build_schedule(self.cfg, total_steps)
        self.flat = self.optimizer.flat
        self.decoder = compress.make(self.cfg.compress, self.flat.size, self.flat.data.dtype)  # --compress
        self._dense = None  # where compressed gradients are added up
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.run_key = run_key  # names this run's shared-memory segments
        self.step = 0
        self.transports = transport.transports(self)
        self.relaxed = Relaxed(self) if self.cfg.relaxed else None  # bounded staleness or backup workers
        self.shards = Shards(self) if self.cfg.servers > 1 else None  # --servers K: they update, we coordinate
        self._initial = (self.flat.data.copy(), self.optimizer.state_dict()) if self.shards else None
        self.carrier: list = []  # rank -> the transport carrying that worker
        self._active: list = []  # the transports carrying any
        self._ranks: dict = {}  # actor -> (rank, workers) it was last given
        self._unreported: list = []
        self._progress_at = time.monotonic()  # when the step loop last got somewhere (heartbeat)
        self._busy = False
        if watch_name is not None:
            self._heartbeat(watch_name)

    # ------------------------------------------------------------------ setup

    def ready(self) -> str:
        """The node this server runs on (any answer means it has started)."""
        return node_id()

    def set_workers(self, workers: list, placement: list) -> dict:
        """Drive these worker actors (in rank order; `placement`: each one's node and device) from
        now on. Each worker is told its rank among them (its shard of every batch), and each
        transport sets up the workers it newly carries and releases the ones it no longer does:
        the same call at the start, after a worker was replaced or the others took a lost one's
        share, and for a new server. Returns transport name -> ranks."""
        # sharded: every worker reaches the shards through the object store (they may be on any node)
        plan = transport.assign(self.cfg.transport if self.shards is None else transport.OBJECT_STORE, placement,
                                node_id())
        self._pause()  # served workers must take the setup calls
        if self.relaxed is not None:
            self.relaxed.reset()  # what was in flight is computed again (with the new workers)
        n = len(workers)
        renumbered = {rank: w for rank, w in enumerate(workers) if self._ranks.get(w) != (rank, n)}
        if renumbered:  # each worker's shard of the batch: by its rank among n (after a shrink, new ones)
            transport.call_all(renumbered, {r: w.set_rank.remote(r, n) for r, w in renumbered.items()}, self.step,
                               max(self.cfg.step_timeout, 60.0))
        self._ranks = {w: (rank, n) for rank, w in enumerate(workers)}
        for name, t in self.transports.items():
            t.connect({rank: workers[rank] for rank in range(len(workers)) if plan[rank] == name}, self.step)
        self.carrier = [self.transports[plan[rank]] for rank in range(len(workers))]
        self._active = [t for t in self.transports.values() if t.workers]
        return {name: sorted(t.workers) for name, t in self.transports.items()}

    def set_shards(self, shards: list) -> None:
        """Use these server shard actors (--servers K; index order) from now on; new ones get
        their ranges of the newest restored state."""
        self.shards.attach(shards)

    def _pause(self) -> None:
        """Let every worker take other Ray calls (ours, during a change of setup)."""
        for t in self.transports.values():
            t.pause()

    def place_parameters(self, storage: np.ndarray) -> None:
        """Move the flat parameters into `storage` (a shared-memory segment, say)."""
        self.flat = flatten(self.model.parameters(), data=storage, grad=self.flat.grad)
        self.optimizer.flat = self.flat

    def close(self) -> None:
        for t in self.transports.values():
            t.close()

    # ------------------------------------------------------------------ steps

    def current_step(self) -> int:
        return self.step

    def _heartbeat(self, watch_name: str) -> None:
        """Send the driver's Watch actor, named `watch_name`, the step reached and how long the
        step loop has gone without progress (0 when idle), every HEARTBEAT_EVERY_S, from a daemon
        thread: the beats stop when this process stops (killed, or SIGSTOPped) and say when the
        loop hangs. The driver makes the Watch only when a call of its own waits long, so short
        runs never start its process; until then the thread looks it up once a beat. (A Ray
        concurrency group answering heartbeat calls instead made every step 0.1 ms slower: the
        actor's methods then run off its main thread.)"""
        def beat():
            watch = None
            while True:
                time.sleep(HEARTBEAT_EVERY_S)
                try:
                    if watch is None:
                        watch = ray.get_actor(watch_name)
                    idle = time.monotonic() - self._progress_at if self._busy else 0.0
                    watch.beat.remote(self.step, idle)
                except ValueError:  # no Watch yet
                    continue
                except Exception:  # a passing failure to reach it: look it up again next beat
                    watch = None
        threading.Thread(target=beat, name="dptrain-heartbeat", daemon=True).start()

    def _progressed(self) -> None:
        self._progress_at = time.monotonic()

    def run_steps(self, first: int, count: int) -> list:
        """Run steps first .. first+count-1; their metrics. An epoch's last step also carries
        the held-out evaluation (run here, so it sees exactly that step's parameters).

        A worker that dies, or does not answer within cfg.step_timeout, raises WorkerLost with
        the server's state that of before the step: the step can be run again. (Lost during an
        epoch's evaluation, the step itself is done: its record, without the evaluation, is
        among the unreported.) The steps a failed call completed wait in `take_unreported`,
        also when a call queued behind it fails in turn.
        """
        if first != self.step:
            raise RuntimeError(f"parameter server at step {self.step} was asked to run from step {first}")
        out: list = []
        self._busy = True
        self._progressed()
        try:
            if self.relaxed is not None:
                self.relaxed.run(first, count, out)
            else:
                for step in range(first, first + count):
                    self.run_step(step, out)
        except BaseException:
            self._unreported.extend(out)
            raise
        finally:
            self._busy = False
        return out

    def starting(self, step: int) -> None:
        """Called as each step begins (faults.py injects server faults here)."""

    def run_step(self, step: int, out: list) -> None:
        """One synchronous step: fan out, fan in, then `conclude` it."""
        self.starting(step)
        t0 = time.perf_counter()
        grads, metrics = self._gather(step)
        self._progressed()
        self.conclude(step, grads, metrics, t0, out)

    def conclude(self, step: int, grads: list, metrics: list, t0: float, out: list, extra: dict | None = None,
                 notify: bool = True) -> None:
        """Update from a step's gradients (or skip a non-finite one), record it (with `extra`),
        maybe evaluate and save. `notify`: let served workers copy finished parameters during
        the update (the synchronous step; a relaxed one's tasks read a consistent snapshot)."""
        bad = [m["rank"] for m in metrics if not m.get("finite", True)]
        if bad and self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"step {step}: NaN or Inf in the loss or gradient of worker(s) {bad}; "
                                 "the parameters are those of the step before (and the last checkpoint is kept)")
        apply_start = time.time()
        if bad:  # skip: no update; the step number still advances, so later batches are unchanged
            record = dict(step_metrics(step, metrics, self.schedule(step)), apply_s=0.0, skipped=True)
            self.step += 1
        else:
            record = self.update(step, grads, metrics, notify)
        record["step_s"] = time.perf_counter() - t0
        # who waited for whom: each worker's computation and the server's update, wall clock
        record["timeline"] = {"compute": [[m["rank"], round(m["start"], 6), round(m["end"], 6)] for m in metrics],
                              "apply": [round(apply_start, 6), round(time.time(), 6)]}
        record.update(extra or {})
        out.append(record)  # the step is done: its record goes out whatever follows
        self._progressed()
        if (step + 1) % self.steps_per_epoch == 0 or step + 1 == self.total_steps:
            record["evaluation"] = self.evaluate("test")
            self._progressed()
        if self.checkpoints and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _gather(self, step: int) -> tuple[list, list]:
        """Every worker's gradient and metrics of `step`, in rank order; WorkerLost naming the first
        that failed. Every transport sends before any receives: all workers compute at once."""
        active = self._active
        for t in active:
            t.send(step)
        self._progressed()  # the workers' time starts now (opening sessions may have taken a while)
        deadline = time.monotonic() + self.cfg.step_timeout
        results: dict = {}
        for t in active:
            results.update(t.receive(step, deadline))
        ranks = range(len(self.carrier))
        return [results[r][0] for r in ranks], [results[r][1] for r in ranks]

    def update(self, step: int, grads: list, metrics: list, notify: bool = True) -> dict:
        """Step `step`'s update from the workers' gradients of loss sums and metrics (rank order):
        their mean gradient, computed block by block inside the optimizer's pass; the step's metrics.
        The transports see it begin and end (`updating`), so a worker never reads a torn version."""
        t0 = time.perf_counter()
        if step != self.step:
            raise RuntimeError(f"parameter server at step {self.step} was sent gradients for step {step}")
        count = max(sum(m["count"] for m in metrics), 1)
        if self.shards is not None:  # each shard updates its range (grads: every worker's K slices)
            lr = self.schedule(step)
            self.shards.update(step, grads, count, lr,
                               [m["payload"] for m in metrics] if self.decoder is not None else None)
            self.step += 1
            return dict(step_metrics(step, metrics, lr), apply_s=time.perf_counter() - t0)
        grad = self.flat.grad
        if self.decoder is not None:  # compressed: their sum, in rank order, first
            grads = [self._decompressed(grads, metrics)]
        self.optimizer.lr = self.schedule(step)
        watching = [t for t in self._active if t.progress] if notify else []

        def final(stop):  # served workers copy the finished part while the rest is updated
            for t in watching:
                t.params_final(stop)
        for t in self._active:
            t.updating(True, self.step)
        self.optimizer.update(self.flat.data, grad, lambda start, stop: mean_gradient(grads, count, grad, start, stop),
                              final if watching else None)
        self.step += 1
        for t in self._active:
            t.updating(False, self.step)
        return dict(step_metrics(step, metrics, self.optimizer.lr), apply_s=time.perf_counter() - t0)

    def _decompressed(self, payloads: list, metrics: list) -> np.ndarray:
        """The sum of the workers' compressed gradients (rank order), dense."""
        if self._dense is None:
            self._dense = np.zeros(self.flat.size, self.flat.data.dtype)
        return compress.decode_sum(self.decoder, payloads, [m["payload"] for m in metrics], self._dense)

    def take_unreported(self) -> list:
        """Metrics of the steps a failed run_steps call completed before it failed."""
        out, self._unreported = self._unreported, []
        return out

    def evaluate(self, split: str = "test") -> dict:
        """Loss (and accuracy) of the current parameters on a split, computed by worker 0."""
        if self.relaxed is not None:
            self.relaxed.settle()  # no task in flight: worker 0 is free and the parameters stay put
        if self.shards is not None:
            self.shards.gather()
        return self.carrier[0].evaluate(0, split, time.monotonic() + self.cfg.step_timeout)

    # ------------------------------------------------------------------ state

    def save_checkpoint(self) -> str | None:
        """Write this server's full state (see dptrain.checkpoint); returns the file's path."""
        if not self.checkpoints:
            return None
        from .. import checkpoint
        if self.shards is not None:  # every shard's range of one step
            self.shards.gather(optimizer=True)
        try:
            path = checkpoint.save(self.checkpoints, self.step, self.flat.data, self.optimizer.state_dict(),
                                   self.layout, self.config, keep=self.cfg.keep_checkpoints,
                                   relaxed=self.relaxed.checkpoint() if self.relaxed is not None else None)
        except checkpoint.CheckpointWriteError as e:  # a full disk must not end a run: the older ones stay valid
            if not self._checkpoint_failing:  # one line, not one per checkpoint while the disk stays full
                log.warning("%s; training goes on (said once until a checkpoint is written again)", e)
            self._checkpoint_failing = True
            return None
        if self._checkpoint_failing:
            log.warning("checkpoints are written again, from step %d on (%s)", self.step, path)
            self._checkpoint_failing = False
        return str(path)

    def restore_checkpoint(self, folder: str | None = None, max_step: int | None = None) -> int | None:
        """Load the newest intact checkpoint (of this model, of at most `max_step` steps) from
        `folder` or our own; returns its step (None: there is none)."""
        from .. import checkpoint
        self._pause()  # served workers keep copies of the parameters they saw
        folder = folder or self.checkpoints
        self._unreported = []  # steps after the state restored run again: their records come then
        state = checkpoint.load_latest(folder, self.layout, str(self.flat.data.dtype), max_step) if folder else None
        if state is None:  # none kept or none yet: a new server starts from the initial parameters,
            if self.shards is not None:  # and so do shards that lost one of theirs
                params, optimizer_state = self._initial
                self.flat.data[...] = params
                self.optimizer.load_state_dict(optimizer_state)
                self.step = 0
                self.shards.restored()
            return None
        self.flat.data[...] = state["params"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        if self.relaxed is not None:
            self.relaxed.restored(folder)
        if self.shards is not None:
            self.shards.restored()  # set_shards sends it to them
        return self.step

    def get_layout(self) -> list:
        """[name, shape, dtype] of every parameter: the model's identity in checkpoints."""
        return self.layout

    def get_weights(self) -> np.ndarray:
        """The current flat parameters."""
        if self.shards is not None:
            self.shards.gather()
        return self.flat.data

    def state_dict(self) -> dict:
        if self.shards is not None:
            self.shards.gather()
        return dict(self.model.state_dict())


HEARTBEAT_EVERY_S = 1.0


class Watch:
    """The driver's end of the server's heartbeat (a small actor beside the driver): the last
    beat and how long ago it came."""

    def __init__(self):
        self.last = {"step": 0, "idle_s": 0.0}
        self.at = time.monotonic()

    def beat(self, step: int, idle_s: float) -> None:
        self.last, self.at = {"step": step, "idle_s": idle_s}, time.monotonic()

    def read(self) -> dict:
        return dict(self.last, age_s=time.monotonic() - self.at)
