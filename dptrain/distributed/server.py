"""The parameter-server actor: the step loop's driving, checkpoints and the heartbeat.

A plain class (Ray makes it remote where it is spawned). What varies between runs is
chosen once, at construction, and lives behind a seam of its own:

- the update (update.py): where a step's gradients meet the optimizer. `LocalUpdate`
  applies the contract's parts 3 and 4 (step.py) here, the workers' gradients of loss
  sums added in rank order, divided once by the batch's example count, fed to the
  optimizer block by block in the same pass; `ShardedUpdate` (shards.py, --servers K)
  has K shard actors do it over their ranges;
- the step loop (loops.py): `Synchronous`, or `Relaxed` (relaxed.py: --staleness,
  --backup-workers), each step concluded by the same `conclude`;
- the codec (compress.py): dense, or --compress's payloads, turned into the update's
  addends by the update itself;
- the transports (transport/): how each worker is reached, set up from the driver's list
  of workers and where they run (`set_workers`).

The collaborators get a `ServerView` (messages.py), not this object. The server drives
chunks of steps itself (`run_steps`), so a step costs one fan-out and fan-in, not a
round trip through the driver.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

from .. import backend, compress
from ..blocks import build_optimizer, build_schedule
from ..config import TrainConfig
from ..models import ModelFactory, layout
from ..step import combine_evaluation, step_metrics
from . import loops, transport, update
from .errors import NonFiniteError, WorkerLost
from .messages import Gradient, ServerView
from .processes import identity, node_id

log = logging.getLogger(__name__)


class ParameterServer:
    """Owns the run's step and drives its update, its step loop and its transports.

    `run_steps(first, n)` runs n steps over the workers given to `set_workers`;
    `apply(step, gradients)` is one step's arithmetic; `save_checkpoint` /
    `restore_checkpoint` write and read its full state. Given `watch_name`, a thread of
    its own sends the step loop's progress to the driver's `Watch` every second: how the
    driver tells a hung server from a slow step.
    """

    def __init__(self, config: dict, factory: ModelFactory, total_steps: int, steps_per_epoch: int,
                 run_key: str = "run", watch_name: str | None = None):
        cfg = TrainConfig.from_dict(config)
        self.config = config
        backend.retain_freed_memory()  # the update's temporaries, every step
        self.checkpoints = os.path.join(cfg.out, "checkpoints") if cfg.out else None
        self._checkpoint_failing = False  # the last checkpoint could not be written (a full disk)
        # the server's arithmetic is a few vector ops over arrays that arrive in host memory: CPU
        self.cfg = cfg.replace(device="cpu", gpus_per_worker=0.0)
        self.model = factory.on("cpu")()  # its parameters are the run's initial ones
        self.layout = layout(self.model)
        optimizer = build_optimizer(self.cfg, self.model.parameters())
        self.schedule = build_schedule(self.cfg, total_steps)
        flat = optimizer.flat
        self.dtype = flat.data.dtype
        codec = compress.codec(self.cfg.compress, flat.size, self.dtype)
        self.update = update.make(self.cfg, self.model, optimizer, codec)  # the seams, chosen once
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.run_key = run_key  # names this run's shared-memory segments
        self.step = 0
        view = ServerView(run_key=run_key, step_timeout=self.cfg.step_timeout, total_steps=total_steps,
                          size=flat.size, dtype=self.dtype, checkpoints=self.checkpoints, version=self.current_step,
                          parameters=self.update.parameters, outgoing=self.update.outgoing, place=self.update.place,
                          carriers=lambda: self.carrier, progressed=self._progressed, begin=self.starting,
                          gather=self._gather, conclude=self.conclude)
        self.loop = loops.make(self.cfg, view)
        self.transports = transport.transports(view)
        self.carrier: list = []  # rank -> the transport carrying that worker
        self._active: list = []  # the transports carrying any
        self._ranks: dict = {}  # actor -> (rank, workers) it was last given
        self._unreported: list = []
        self._progress_at = time.monotonic()  # when the step loop last got somewhere (heartbeat)
        self._busy = False
        if watch_name is not None:
            self._heartbeat(watch_name)

    # ------------------------------------------------------------------ setup

    def ready(self) -> dict:
        """This server's process and node (processes.identity; any answer means it has started)."""
        return identity()

    def set_workers(self, workers: list, placement: list) -> dict:
        """Drive these worker actors (in rank order; `placement`: each one's node and device) from
        now on. Each worker is told its rank among them (its shard of every batch), and each
        transport sets up the workers it newly carries and releases the ones it no longer does:
        the same call at the start, after a worker was replaced or the others took a lost one's
        share, and for a new server. The update's threads follow (--update-threads auto). Returns
        {"transports": transport name -> ranks, "update_threads": how many the update uses}."""
        here = node_id()
        plan = transport.assign(self.update.transport_setting(self.cfg.transport, placement, here), placement, here)
        self._pause()  # served workers must take the setup calls
        self.loop.reset()  # what was in flight is computed again (with the new workers)
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
        threads = self.cfg.update_threads or update_threads(placement, node_id(), self.loop)
        self.update.use_threads(threads)
        return {"transports": {name: sorted(t.workers) for name, t in self.transports.items()},
                "update_threads": threads}

    def set_shards(self, shards: list) -> None:
        """Use these server shard actors (--servers K; index order) from now on; new ones get
        their ranges of the newest restored state."""
        self.update.attach(shards)

    def _pause(self) -> None:
        """Let every worker take other Ray calls (ours, during a change of setup)."""
        for t in self.transports.values():
            t.pause()

    def close(self) -> None:
        for t in self.transports.values():
            t.close()
        self.update.close()

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
        """Run steps first .. first+count-1; their metrics. An epoch's last step (and with
        --eval-every, every such step) also carries the held-out evaluation (run here, so it sees
        exactly that step's parameters).

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
            self.loop.run(first, count, out)
        except BaseException:
            self._unreported.extend(out)
            raise
        finally:
            self._busy = False
        return out

    def starting(self, step: int) -> None:
        """Called as each step begins (faults.py injects server faults here)."""

    def conclude(self, step: int, gradients: list, t0: float, out: list, extra: dict | None = None) -> None:
        """Update from a step's gradients (or skip a non-finite one), record it (with `extra`),
        maybe evaluate and save."""
        metrics = [g.metrics for g in gradients]
        bad = [m["rank"] for m in metrics if not m.get("finite", True)]
        if bad and self.cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"step {step}: NaN or Inf in the loss or gradient of worker(s) {bad}; "
                                 "the parameters are those of the step before (and the last checkpoint is kept)")
        apply_start = time.time()
        if bad:  # skip: no update; the step number still advances, so later batches are unchanged
            record = dict(step_metrics(step, metrics, self.schedule(step)), apply_s=0.0, skipped=True)
            self.step += 1
        else:
            record = self.apply(step, gradients)
        record["step_s"] = time.perf_counter() - t0
        # who waited for whom: each worker's computation and the server's update, wall clock
        record["timeline"] = {"compute": [[m["rank"], round(m["start"], 6), round(m["end"], 6)] for m in metrics],
                              "apply": [round(apply_start, 6), round(time.time(), 6)]}
        record.update(extra or {})
        out.append(record)  # the step is done: its record goes out whatever follows
        self._progressed()
        if self._evaluates_after(step):
            record["evaluation"] = self.evaluate("test")
            self._progressed()
        if self.checkpoints and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def _evaluates_after(self, step: int) -> bool:
        """Whether `step` ends with an evaluation of the held-out split: an epoch's end, the last
        step, or every --eval-every steps."""
        every = self.cfg.eval_every
        return ((step + 1) % self.steps_per_epoch == 0 or step + 1 == self.total_steps
                or bool(every and (step + 1) % every == 0))

    def _gather(self, step: int) -> list:
        """Every worker's Gradient of `step`, in rank order; WorkerLost naming the first that
        failed. Every transport sends before any receives: all workers compute at once."""
        active = self._active
        for t in active:
            t.send(step)
        self._progressed()  # the workers' time starts now (opening sessions may have taken a while)
        deadline = time.monotonic() + self.cfg.step_timeout
        results: dict = {}
        try:
            for t in active:
                results.update(t.receive(step, deadline))
        except WorkerLost:
            self.update.check_outgoing(step)  # a shard lost with the worker's node goes first
            raise
        return [results[r] for r in range(len(self.carrier))]

    def apply(self, step: int, gradients: list[Gradient]) -> dict:
        """Step `step`'s update from the workers' gradients of loss sums (rank order): their mean
        gradient, by the update seam; the step's metrics."""
        t0 = time.perf_counter()
        if step != self.step:
            raise RuntimeError(f"parameter server at step {self.step} was sent gradients for step {step}")
        metrics = [g.metrics for g in gradients]
        lr = self.schedule(step)
        norm = self.update.apply(step, gradients, max(sum(m["count"] for m in metrics), 1), lr, self._active)
        self.step += 1
        return dict(step_metrics(step, metrics, lr), apply_s=time.perf_counter() - t0, grad_norm=norm)

    def take_unreported(self) -> list:
        """Metrics of the steps a failed run_steps call completed before it failed."""
        out, self._unreported = self._unreported, []
        return out

    def evaluate(self, split: str = "test", final: bool = False) -> dict:
        """Loss (and accuracy) of the current parameters on a split, as a data-parallel job: every
        worker evaluates its contiguous part of the evaluation's batches (step.evaluation_plan)
        and their batches' sums are added in order and divided once, so N workers give one
        process's figure bit for bit. With the seconds it took (`eval_s`)."""
        self.loop.settle()  # no task in flight: the workers are free and the parameters stay put
        t0 = time.perf_counter()
        n = len(self.carrier)
        for t in self._active:
            t.send_evaluation(split, n, final)
        deadline = time.monotonic() + self.cfg.step_timeout
        parts: dict = {}
        for t in self._active:
            parts.update(t.receive_evaluation(deadline))
        batches = [b for rank in range(n) for b in parts[rank]["batches"]]
        result = combine_evaluation(batches, parts[0]["classification"])
        result["eval_s"] = time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------ state

    def save_checkpoint(self) -> str | None:
        """Write this server's full state (see dptrain.checkpoint); returns the file's path."""
        if not self.checkpoints:
            return None
        from .. import checkpoint
        params, optimizer_state = self.update.state()
        try:
            path = checkpoint.save(self.checkpoints, self.step, params, optimizer_state, self.layout, self.config,
                                   keep=self.cfg.keep_checkpoints, relaxed=self.loop.checkpoint())
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
        `folder` or our own; returns its step (None: there is none, and the initial state holds)."""
        from .. import checkpoint
        self._pause()  # served workers keep copies of the parameters they saw
        folder = folder or self.checkpoints
        self._unreported = []  # steps after the state restored run again: their records come then
        state = checkpoint.load_latest(folder, self.layout, str(self.dtype), max_step) if folder else None
        if state is None:  # none kept or none yet: the initial parameters (shards that lost one of theirs too)
            self.update.restore(None)
            self.step = 0
            return None
        self.update.restore((state["params"], state["optimizer"], state["step"]))
        self.step = state["step"]
        self.loop.restored(folder)
        return self.step

    def get_layout(self) -> list:
        """[name, shape, dtype] of every parameter: the model's identity in checkpoints."""
        return self.layout

    def get_weights(self):
        """The current flat parameters."""
        return self.update.parameters()

    def state_dict(self) -> dict:
        self.update.parameters()  # the model's parameters are views of the update's flat buffer
        return dict(self.model.state_dict())


def update_threads(placement: list, here: str, loop) -> int:
    """--update-threads auto: this thread, and one more per worker on this node while the step loop
    keeps every worker waiting for the update (their cores are idle then), within this machine's."""
    mine = sum(p["node_id"] == here for p in placement) if loop.workers_wait_for_update else 0
    return max(1, min(1 + mine, backend.usable_cores()))


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
