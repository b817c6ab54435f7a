"""The two actors, as plain classes: Ray makes them remote where they are spawned.

Only numpy arrays and small dicts cross process boundaries: parameters and
gradients travel as one flat numpy array each, metrics as dicts.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import backend
from ..config import TrainConfig
from ..data import BatchSampler, Dataset
from ..loop import Replica, build_optimizer, build_schedule
from ..models import ModelFactory, layout
from ..nn import flatten
from . import control
from .shm import SharedArray, unlink


class WorkerError(RuntimeError):
    """A worker failed; the message names the worker and the step."""


class WorkerLost(RuntimeError):
    """A worker died or hung during a step; the server's state is that of before the step."""

    def __init__(self, rank: int, step: int, reason: str):
        super().__init__(f"worker {rank} lost at step {step}: {reason}")
        self.rank, self.step, self.reason = rank, step, reason

    def __reduce__(self):  # crosses process boundaries inside Ray's task errors
        return (WorkerLost, (self.rank, self.step, self.reason))


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; the message names the step and the worker(s)."""


class Worker:
    """One model replica computing gradients on its shard of every global batch.

    The dataset arrives once, at construction, from Ray's object store: on the
    worker's node the arrays are read-only views of shared memory, not copies.
    `factory` builds the model (dptrain.models.ModelFactory) and `loss` is the loss
    function; both arrive pickled by value where they come from a user's file.
    """

    def __init__(self, config: dict, factory: ModelFactory, loss, dataset: Dataset, rank: int, num_workers: int,
                 faults: list | None = None):
        self.cfg = TrainConfig.from_dict(config)
        self.rank, self.num_workers = rank, num_workers
        self.replica = Replica(self.cfg, dataset, factory, loss)
        self.sampler = BatchSampler(len(dataset), self.cfg.batch_size, self.cfg.seed)
        self.faults = [f for f in (faults or []) if f.get("role", "worker") == "worker" and f["rank"] == rank]
        self._params_shm = self._grad_shm = None  # set by use_shared_memory
        self._loaded = 0  # parameters [0, _loaded) of the server's segment are copied in and current

    def use_shared_memory(self, params_segment: str, run_key: str = "run") -> str:
        """Switch to the shared-memory transport (a worker on the server's node, on the CPU).

        Backward writes the gradient straight into a segment of ours, whose name we return
        to the server. The parameters are copied from the server's segment into the model's
        own flat buffer, region by region as the server finishes them (see `serve`).
        Computing on the segment in place would save that copy; within one process forward
        and backward ran as fast on it as on the private buffer, but inside the trainer it
        has not been measured against the mostly hidden copy.
        """
        self.close()  # a new server: drop the segments of the old one
        flat = self.replica.flat
        self._params_shm = SharedArray.attach(params_segment, flat.size, flat.data.dtype)
        self._params_shm.array.flags.writeable = False  # workers never write parameters
        self._grad_shm = SharedArray.create(flat.size, flat.data.dtype, f"{run_key}-grad{self.rank}")
        self.replica.bind_gradients(self._grad_shm.array)
        self._loaded = 0
        return self._grad_shm.name

    def set_rank(self, rank: int, num_workers: int) -> str | None:
        """Take shard `rank` of `num_workers` from now on (after another worker was lost).
        Returns our gradient segment's name, if we use shared memory."""
        self.rank, self.num_workers = rank, num_workers
        return self._grad_shm.name if self._grad_shm is not None else None

    def close(self) -> None:
        """Release shared-memory segments (the trainer calls this before killing the actor)."""
        if self._grad_shm is not None:
            self.replica.bind_gradients(None)  # no views of the segment may outlive it
        for seg in (self._params_shm, self._grad_shm):
            if seg is not None:
                seg.close()
        self._params_shm = self._grad_shm = None

    def ready(self) -> dict:
        """Where this worker runs (the driver waits on it, with a timeout, before step 0)."""
        return {"rank": self.rank, "pid": os.getpid(), "node_id": _node_id(), "device": self.cfg.device}

    def layout(self) -> list:
        """[name, shape, dtype] of every parameter of this replica (the driver checks they match the server's)."""
        return layout(self.replica.model)

    def memory(self) -> dict:
        """This process's memory: rss counts shared pages (the object store's), uss only its own."""
        import psutil
        info = psutil.Process().memory_full_info()
        return {"rss": info.rss, "uss": info.uss, "dataset_bytes": int(self.replica.x_train.nbytes)}

    def compute_gradients(self, params: np.ndarray, step: int):
        """Load `params`, backpropagate the loss SUM over this worker's shard of `step`.

        Returns (flat gradient as numpy, metrics): one message per worker per step. With
        shared memory `params` is only the server's step number: the values come from the
        server's segment and the gradient goes to ours, and the reply is (None, metrics).
        """
        try:
            t0 = time.perf_counter()
            shared = self._grad_shm is not None
            if shared:
                self._load_shared(self.replica.flat.size)
                self._loaded = 0  # the server's next update changes them
            else:
                self.replica.load_parameters(params)
            indices, first_position = self.sampler.shard_at(step, self.num_workers, self.rank)
            loss_sum, correct, count = self.replica.compute_gradients(indices, step, first_position)
            grad = backend.to_numpy(self.replica.flat.grad)
            for fault in self.faults:
                if fault["step"] == step:
                    grad = inject_fault(fault, grad, self.rank, step)
            if shared and grad is not self._grad_shm.array:  # an injected fault replaced it
                np.copyto(self._grad_shm.array, grad)
            # one reduction: NaN and Inf propagate through a sum (the server refuses such a step)
            finite = bool(np.isfinite(loss_sum) and np.isfinite(grad.sum()))
            metrics = {"rank": self.rank, "loss_sum": loss_sum, "correct": correct, "count": count,
                       "finite": finite, "compute_s": time.perf_counter() - t0}
            return (None if shared else grad), metrics
        except Exception as e:
            raise WorkerError(f"worker {self.rank} failed at step {step}: {type(e).__name__}: {e}") from e

    def evaluate(self, params: np.ndarray, split: str = "test") -> dict:
        if self._params_shm is not None:
            self._load_shared(self.replica.flat.size)
        else:
            self.replica.load_parameters(params)
        return self.replica.evaluate(split)

    def _load_shared(self, upto: int) -> None:
        """Copy the server's parameters [_loaded, upto) from its segment into the model."""
        if upto > self._loaded:
            self.replica.load_parameters(self._params_shm.array, self._loaded, upto)
            self._loaded = upto

    def serve(self, address: str) -> int:
        """Take requests from the parameter server over its control channel (control.py) until
        it says stop or goes away; returns how many were served. For shared-memory workers
        only: a step request carries only the step number.

        Requests: {"op": "step", "step": k} -> {"metrics": ...} (compute_gradients);
        {"op": "evaluate", "split": s} -> {"evaluation": ...}; {"op": "params", "upto": i},
        no answer: the server's update is final up to element i, so we copy that much while
        it updates the rest (most of the copy leaves the step's critical path);
        {"op": "stop"}. A failure is answered with {"error": message} and the loop goes on.
        While serving, the worker takes no other Ray calls: the server's `end_sessions`
        (called by its set_workers, reset_shared_workers and close) lets it go.
        """
        chan = control.connect(address)
        served = 0
        self._loaded = 0  # a new session: the server may have restored other parameters
        try:
            chan.send({"rank": self.rank})
            while True:
                request = chan.recv()
                op = request.get("op")
                if op == "stop":
                    return served
                if op == "params":
                    self._load_shared(int(request["upto"]))
                    continue
                try:
                    if op == "step":
                        reply = {"metrics": self.compute_gradients(None, int(request["step"]))[1]}
                    elif op == "evaluate":
                        reply = {"evaluation": self.evaluate(None, request["split"])}
                    else:
                        reply = {"error": f"worker {self.rank}: unknown request {op!r}"}
                except Exception as e:
                    reply = {"error": str(e)}
                chan.send(reply)
                served += 1
        except control.ChannelClosed:  # the server is gone (killed, or replaced)
            return served
        finally:
            chan.close()
            self._loaded = 0  # outside a session nobody says when the parameters change


class ParameterServer:
    """Owns the flat parameters and the optimizer; averages gradients exactly.

    `apply_gradients(step, *results)` adds the workers' gradients of loss SUMS in
    worker order, divides once by the total example count (the full-batch mean
    gradient, whatever the worker count), steps the optimizer in place and
    returns the new parameters as one array, plus the step's metrics.
    `run_steps(first, n)` drives n steps over the workers given to `set_workers`:
    workers on shared memory over control channels (control.py), the others by
    Ray calls; `save_checkpoint` / `restore_checkpoint` write and read its full state.
    """

    def __init__(self, config: dict, factory: ModelFactory, total_steps: int, faults: list | None = None):
        cfg = TrainConfig.from_dict(config)
        self.config = config
        self.faults = [f for f in (faults or []) if f.get("role") == "server"]
        self.checkpoints = os.path.join(cfg.out, "checkpoints") if cfg.out else None
        # the server's arithmetic is a few vector ops over arrays that arrive in host memory: CPU
        self.cfg = cfg.replace(device="cpu", gpus_per_worker=0.0)
        self.model = factory.on("cpu")()  # its parameters are the run's initial ones
        self.layout = layout(self.model)
        self.optimizer = build_optimizer(self.cfg, self.model.parameters())
        self.schedule = build_schedule(self.cfg, total_steps)
        self.flat = self.optimizer.flat
        self.step = 0
        self.workers: list = []
        self._unreported: list = []
        self._params_shm = None
        self._shared_grads: dict = {}  # rank -> SharedArray of a worker using shared memory
        self._publish = True  # return the parameters as an object (some worker reads them that way)
        self._run_key = "run"
        self._listener: control.Listener | None = None
        self._sessions: dict = {}  # rank -> (Channel, ObjectRef of the worker's serve call)
        self._notified = 0  # how far served workers were told this update's parameters are final

    def enable_shared_memory(self, run_key: str = "run") -> str:
        """Move the flat parameters into a shared-memory segment; returns its name."""
        self._run_key = run_key
        if self._params_shm is None:
            seg = SharedArray.create(self.flat.size, self.flat.data.dtype, f"{run_key}-params")
            self.flat = flatten(self.model.parameters(), data=seg.array, grad=self.flat.grad)
            self.optimizer.flat = self.flat
            self._params_shm = seg
        return self._params_shm.name

    def register_shared_worker(self, rank: int, grad_segment: str) -> None:
        self._drop_session(rank, stop=True)
        old = self._shared_grads.pop(rank, None)
        if old is not None and old.name != grad_segment:
            old.close()
        self._shared_grads[rank] = SharedArray.attach(grad_segment, self.flat.size, self.flat.data.dtype)

    def release_worker(self, rank: int) -> None:
        """Forget a lost worker's gradient segment and remove it (its owner died with it)."""
        self._drop_session(rank, stop=False)
        seg = self._shared_grads.pop(rank, None)
        if seg is not None:
            seg.close()
            unlink(seg.name)

    def reset_shared_workers(self, release: list = ()) -> None:
        """Drop every worker's gradient segment (the ranks are about to change); remove the
        segments of the workers in `release` (lost: their owners cannot)."""
        self.end_sessions()
        for rank, seg in list(self._shared_grads.items()):
            seg.close()
            if rank in release:
                unlink(seg.name)
        self._shared_grads = {}

    def current_step(self) -> int:
        return self.step

    def set_publish(self, publish: bool) -> None:
        """Whether apply_gradients returns the parameters (False: all workers share memory)."""
        self._publish = publish

    def close(self) -> None:
        self.end_sessions()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for seg in [self._params_shm, *self._shared_grads.values()]:
            if seg is not None:
                seg.close()
        self._params_shm, self._shared_grads = None, {}

    def node_id(self) -> str:
        return _node_id()

    def set_workers(self, workers: list, steps_per_epoch: int, total_steps: int) -> None:
        """The worker actors this server drives in `run_steps`, in rank order."""
        self.end_sessions()  # some of them may be new
        self.workers = list(workers)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def _params_for_workers(self):
        """What a step's compute calls receive: the parameters as one object in Ray's store
        (put once, read by every object-store worker), or only the step number when every
        worker reads them in shared memory."""
        import ray
        return ray.put(self.flat.data) if self._publish else self.step

    def run_steps(self, first: int, count: int) -> list:
        """Run steps first .. first+count-1: each a fan-out of compute calls and a fan-in
        into apply_gradients. Returns each step's metrics; an epoch's last step also
        carries the held-out evaluation (run here, so it sees exactly that step's parameters).

        A worker that dies, or does not answer within cfg.step_timeout, raises WorkerLost
        with the server's state still that of before the step: the step can be run again.
        (Lost during an epoch's evaluation, the step itself is done: its record, without the
        evaluation, is among the unreported.) The steps a failed call completed wait in
        `take_unreported`, also when a call queued behind it fails in turn.
        """
        if first != self.step:
            raise RuntimeError(f"parameter server at step {self.step} was asked to run from step {first}")
        out = []
        try:
            self._run(first, count, out)
        except BaseException:
            self._unreported.extend(out)
            raise
        return out

    def _run(self, first: int, count: int, out: list) -> None:
        for step in range(first, first + count):
            t0 = time.perf_counter()
            for fault in self.faults:  # fault injection: the server dies, or hangs, before the step
                if fault["step"] == step and fault["kind"] == "exit":
                    os._exit(1)
                if fault["step"] == step and fault["kind"] == "hang":
                    time.sleep(fault.get("seconds", 3600))
            results = self._gather(step)
            bad = [m["rank"] for _, m in results if not m.get("finite", True)]
            if bad and self.cfg.on_nonfinite == "stop":
                raise NonFiniteError(f"step {step}: NaN or Inf in the loss or gradient of worker(s) {bad}; "
                                     "the parameters are those of the step before (and the last checkpoint is kept)")
            if bad:  # skip: no update; the step number still advances, so later batches are unchanged
                metrics = self._metrics(step, results, skipped=True, t0=t0)
                self.step += 1
            else:
                _, metrics = self.apply_gradients(step, *results)
            metrics["step_s"] = time.perf_counter() - t0
            out.append(metrics)  # the step is done: its record goes out whatever follows
            if (step + 1) % self.steps_per_epoch == 0 or step + 1 == self.total_steps:
                metrics["evaluation"] = self.evaluate("test")
            if self.checkpoints and self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save_checkpoint()

    def take_unreported(self) -> list:
        """Metrics of the steps a failed run_steps call completed before it failed."""
        out, self._unreported = self._unreported, []
        return out

    def _gather(self, step: int) -> list:
        """Every worker's (gradient, metrics) for `step`, or WorkerLost naming the first that failed.

        Shared-memory workers get the step number over their control channel; the others
        a Ray call with the parameters. Either way every worker computes at once.
        """
        import ray
        self._open_sessions(step)
        deadline = time.monotonic() + self.cfg.step_timeout
        for rank, (chan, _) in list(self._sessions.items()):
            try:
                chan.send({"op": "step", "step": step})
            except control.ChannelClosed:
                self._session_lost(rank, step)
        results = [None] * len(self.workers)
        others = [rank for rank in range(len(self.workers)) if rank not in self._sessions]
        if others:
            params = self._params_for_workers()
            refs = [self.workers[rank].compute_gradients.remote(params, step) for rank in others]
            ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.cfg.step_timeout)
            if pending:
                raise self._hung([others[refs.index(r)] for r in pending], step)
            for rank, ref in zip(others, refs):
                try:
                    results[rank] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                    raise WorkerLost(rank, step, _lost_reason(e)) from None
        for rank in sorted(self._sessions):
            results[rank] = (None, self._reply(rank, step, deadline)["metrics"])
        return results

    # ------------------------------------------------------------------ control channels

    def _open_sessions(self, step: int) -> None:
        """Start a control session with every shared-memory worker that has none."""
        import ray
        todo = [r for r in self._shared_grads if r < len(self.workers) and r not in self._sessions]
        if not todo:
            return
        if self._listener is None:
            self._listener = control.Listener(self._run_key)
        refs = {rank: self.workers[rank].serve.remote(self._listener.address) for rank in todo}
        deadline = time.monotonic() + self.cfg.step_timeout
        while refs:
            try:  # short waits: a worker that died instead of connecting shows up between them
                chan, hello = self._listener.accept(min(0.5, max(deadline - time.monotonic(), 0.01)))
            except control.ChannelTimeout:
                done, _ = ray.wait(list(refs.values()), num_returns=1, timeout=0)
                if done:
                    rank = next(r for r, ref in refs.items() if ref == done[0])
                    self._sessions[rank] = (None, refs.pop(rank))
                    self._session_lost(rank, step)
                if time.monotonic() > deadline:
                    raise self._hung(sorted(refs), step, "did not connect")
                continue
            rank = int(hello["rank"])
            self._sessions[rank] = (chan, refs.pop(rank))

    def _reply(self, rank: int, step: int, deadline: float) -> dict:
        """Worker `rank`'s answer on its channel; WorkerLost if it dies or misses `deadline`."""
        chan, _ = self._sessions[rank]
        try:
            reply = chan.recv(deadline)
        except control.ChannelTimeout:
            self._drop_session(rank, stop=False)
            raise self._hung([rank], step) from None
        except control.ChannelClosed:
            self._session_lost(rank, step)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply

    def _hung(self, ranks: list, step: int, what: str = "no answer") -> WorkerLost:
        """Kill workers that missed the step timeout (a hung worker is a lost worker: it must
        not come back stale); the error to raise, naming the first."""
        import ray
        for rank in ranks:
            ray.kill(self.workers[rank])
        return WorkerLost(ranks[0], step, f"{what} within {self.cfg.step_timeout:g} s (hung?)")

    def _session_lost(self, rank: int, step: int):
        """A channel closed under us: WorkerError if the worker's serve call failed, else WorkerLost."""
        import ray
        _, ref = self._sessions.pop(rank)
        try:
            ray.get(ref, timeout=10)
        except ray.exceptions.RayTaskError as e:
            raise WorkerError(f"worker {rank} failed at step {step}: {getattr(e, 'cause', None) or e}") from None
        except ray.exceptions.RayActorError as e:
            raise WorkerLost(rank, step, f"its process died ({type(e).__name__})") from None
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.workers[rank])
        raise WorkerLost(rank, step, "its control channel closed")

    def _notify(self, stop: int) -> None:
        """Tell served workers, in a few messages per update, how far the new parameters are final."""
        if stop - self._notified < self.flat.size // NOTICES_PER_UPDATE and stop != self.flat.size:
            return
        self._notified = stop
        for chan, _ in self._sessions.values():
            try:
                chan.send({"op": "params", "upto": stop})
            except control.ChannelClosed:  # that worker is gone: the next step's send says so
                pass

    def _drop_session(self, rank: int, stop: bool) -> None:
        chan, _ = self._sessions.pop(rank, (None, None))
        if chan is not None:
            if stop:
                try:
                    chan.send({"op": "stop"})
                except control.ChannelClosed:
                    pass
            chan.close()

    def end_sessions(self) -> None:
        """Let every served worker return from `serve`, so it takes Ray calls again."""
        for rank in list(self._sessions):
            self._drop_session(rank, stop=True)

    def save_checkpoint(self) -> str | None:
        """Write this server's full state (see dptrain.checkpoint); returns the file's path."""
        if not self.checkpoints:
            return None
        from .. import checkpoint
        return str(checkpoint.save(self.checkpoints, self.step, self.flat.data, self.optimizer.state_dict(),
                                   self.layout, self.config, keep=self.cfg.keep_checkpoints))

    def restore_checkpoint(self, folder: str | None = None, max_step: int | None = None) -> int | None:
        """Load the newest intact checkpoint (of this model, of at most `max_step` steps) from
        `folder` or our own; returns its step."""
        from .. import checkpoint
        self.end_sessions()  # served workers keep copies of the parameters they saw
        folder = folder or self.checkpoints
        if folder is None:  # no checkpoints kept: a new server starts from the initial parameters
            return None
        state = checkpoint.load_latest(folder, self.layout, str(self.flat.data.dtype), max_step)
        if state is None:
            return None
        self.flat.data[...] = state["params"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        return self.step

    def evaluate(self, split: str = "test") -> dict:
        """Loss (and accuracy) of the current parameters on a split, computed by worker 0."""
        import ray
        if 0 in self._sessions:
            try:
                self._sessions[0][0].send({"op": "evaluate", "split": split})
            except control.ChannelClosed:
                self._session_lost(0, self.step)
            return self._reply(0, self.step, time.monotonic() + self.cfg.step_timeout)["evaluation"]
        try:
            return ray.get(self.workers[0].evaluate.remote(self._params_for_workers(), split),
                           timeout=self.cfg.step_timeout)
        except ray.exceptions.GetTimeoutError:
            raise self._hung([0], self.step, "no evaluation") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            raise WorkerLost(0, self.step, _lost_reason(e)) from None

    def get_layout(self) -> list:
        """[name, shape, dtype] of every parameter: the model's identity in checkpoints."""
        return self.layout

    def get_weights(self) -> np.ndarray:
        """The current flat parameters."""
        return self.flat.data

    def apply_gradients(self, step: int, *results):
        t0 = time.perf_counter()
        if step != self.step:
            raise RuntimeError(f"parameter server at step {self.step} was sent gradients for step {step}")
        grad = self.flat.grad
        count = max(sum(r[1]["count"] for r in results), 1)
        grads = [g if g is not None else self._shared_grads[m["rank"]].array for g, m in results]

        def prepare(start, stop):  # the mean gradient of this block, summed in worker order
            out = grad[start:stop]
            if len(grads) == 1:
                np.divide(grads[0][start:stop], count, out=out)
                return
            np.add(grads[0][start:stop], grads[1][start:stop], out=out)
            for g in grads[2:]:
                out += g[start:stop]
            out /= count

        self.optimizer.lr = self.schedule(step)
        self._notified = 0
        self.optimizer.update(self.flat.data, grad, prepare, self._notify if self._sessions else None)
        self.step += 1
        return (self.flat.data if self._publish else step), self._metrics(step, results, skipped=False, t0=t0)

    def _metrics(self, step: int, results, skipped: bool, t0: float) -> dict:
        """A step's metrics; run_steps adds the whole step's time as step_s."""
        count = sum(r[1]["count"] for r in results)
        metrics = {"step": step, "loss": sum(r[1]["loss_sum"] for r in results) / max(count, 1), "count": count,
                   "correct": sum(r[1]["correct"] for r in results), "lr": self.schedule(step),
                   "compute_s": max(r[1]["compute_s"] for r in results), "apply_s": time.perf_counter() - t0}
        if skipped:
            metrics["skipped"] = True
        return metrics

    def state_dict(self) -> dict:
        return dict(self.model.state_dict())


NOTICES_PER_UPDATE = 4  # "params" messages per update to each served worker (see Worker.serve)

FAULT_KINDS = ("raise", "exit", "nan", "hang")


def inject_fault(fault: dict, grad: np.ndarray, rank: int, step: int) -> np.ndarray:
    """Fault injection for tests and the soak script: {"rank", "step", "kind"[, "seconds"]}.

    raise: an exception; exit: the worker process dies; nan: a NaN gradient; hang: sleep.
    """
    kind = fault["kind"]
    if kind == "raise":
        raise RuntimeError(f"injected fault (rank {rank}, step {step})")
    if kind == "exit":
        os._exit(1)
    if kind == "nan":
        grad = grad.copy()
        grad[0] = np.nan
        return grad
    if kind == "hang":
        time.sleep(fault.get("seconds", 3600))
        return grad
    raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")


def _lost_reason(error: BaseException) -> str:
    """Why a worker counts as lost: its process died (RayActorError), or its result lived in the
    object store of a node that died (ObjectLostError, e.g. ObjectReconstructionFailedError)."""
    import ray
    if isinstance(error, ray.exceptions.ObjectLostError):
        return f"its result was lost with its node ({type(error).__name__})"
    return f"its process died ({type(error).__name__})"


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (the actors are plain classes too)
        return "local"
