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
from ..loop import Replica, build_model, build_optimizer, build_schedule
from ..nn import flatten
from .shm import SharedArray


class WorkerError(RuntimeError):
    """A worker failed; the message names the worker and the step."""


class Worker:
    """One model replica computing gradients on its shard of every global batch.

    The dataset arrives once, at construction, from Ray's object store: on the
    worker's node the arrays are read-only views of shared memory, not copies.
    """

    def __init__(self, config: dict, dims: list, dataset: Dataset, rank: int, num_workers: int,
                 faults: list | None = None):
        self.cfg = TrainConfig.from_dict(config)
        self.rank, self.num_workers = rank, num_workers
        self.replica = Replica(self.cfg, dataset, dims)
        self.sampler = BatchSampler(len(dataset), self.cfg.batch_size, self.cfg.seed)
        self.faults = [f for f in (faults or []) if f["rank"] == rank]
        self._params_shm = self._grad_shm = None  # set by use_shared_memory

    def use_shared_memory(self, params_segment: str) -> str:
        """Switch to the shared-memory transport (a worker on the server's node, on the CPU).

        Each step copies the parameters from the server's segment into the model's own
        flat buffer and the gradient out into a segment of ours, whose name we return to
        the server. Computing on the segments in place would save those two copies but
        costs more: shared-memory pages are 4 KiB, the private buffers get transparent
        huge pages, and the matrix products ran 15% slower on the former.
        """
        flat = self.replica.flat
        self._params_shm = SharedArray.attach(params_segment, flat.size, flat.data.dtype)
        self._params_shm.array.flags.writeable = False  # workers never write parameters
        self._grad_shm = SharedArray.create(flat.size, flat.data.dtype, f"grad{self.rank}")
        return self._grad_shm.name

    def close(self) -> None:
        """Release shared-memory segments (the trainer calls this before killing the actor)."""
        for seg in (self._params_shm, self._grad_shm):
            if seg is not None:
                seg.close()
        self._params_shm = self._grad_shm = None

    def ready(self) -> dict:
        """Where this worker runs (the driver waits on it, with a timeout, before step 0)."""
        return {"rank": self.rank, "pid": os.getpid(), "node_id": _node_id(), "device": self.cfg.device}

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
            self.replica.load_parameters(self._params_shm.array if shared else params)
            indices = self.sampler.shard(step, self.num_workers, self.rank)
            loss_sum, correct, count = self.replica.compute_gradients(indices)
            grad = backend.to_numpy(self.replica.flat.grad)
            for fault in self.faults:
                if fault["step"] == step:
                    grad = inject_fault(fault, grad, self.rank, step)
            if shared:
                np.copyto(self._grad_shm.array, grad)
            metrics = {"rank": self.rank, "loss_sum": loss_sum, "correct": correct, "count": count,
                       "compute_s": time.perf_counter() - t0}
            return (None if shared else grad), metrics
        except Exception as e:
            raise WorkerError(f"worker {self.rank} failed at step {step}: {type(e).__name__}: {e}") from e

    def evaluate(self, params: np.ndarray, split: str = "test") -> dict:
        self.replica.load_parameters(self._params_shm.array if self._params_shm is not None else params)
        return self.replica.evaluate(split)


class ParameterServer:
    """Owns the flat parameters and the optimizer; averages gradients exactly.

    `apply_gradients(step, *results)` adds the workers' gradients of loss SUMS in
    worker order, divides once by the total example count (the full-batch mean
    gradient, whatever the worker count), steps the optimizer in place and
    returns the new parameters as one array, plus the step's metrics.
    """

    def __init__(self, config: dict, dims: list, total_steps: int):
        cfg = TrainConfig.from_dict(config)
        # the server's arithmetic is a few vector ops over arrays that arrive in host memory: CPU
        self.cfg = cfg.replace(device="cpu", gpus_per_worker=0.0)
        self.model = build_model(self.cfg, dims)
        self.optimizer = build_optimizer(self.cfg, self.model.parameters())
        self.schedule = build_schedule(self.cfg, total_steps)
        self.flat = self.optimizer.flat
        self.step = 0
        self._last_apply = time.perf_counter()
        self._params_shm = None
        self._shared_grads: dict = {}  # rank -> SharedArray of a worker using shared memory
        self._publish = True  # return the parameters as an object (some worker reads them that way)

    def enable_shared_memory(self) -> str:
        """Move the flat parameters into a shared-memory segment; returns its name."""
        if self._params_shm is None:
            seg = SharedArray.create(self.flat.size, self.flat.data.dtype, "params")
            self.flat = flatten(self.model.parameters(), data=seg.array, grad=self.flat.grad)
            self.optimizer.flat = self.flat
            self._params_shm = seg
        return self._params_shm.name

    def register_shared_worker(self, rank: int, grad_segment: str) -> None:
        self._shared_grads[rank] = SharedArray.attach(grad_segment, self.flat.size, self.flat.data.dtype)

    def set_publish(self, publish: bool) -> None:
        """Whether apply_gradients returns the parameters (False: all workers share memory)."""
        self._publish = publish

    def close(self) -> None:
        for seg in [self._params_shm, *self._shared_grads.values()]:
            if seg is not None:
                seg.close()
        self._params_shm, self._shared_grads = None, {}

    def node_id(self) -> str:
        return _node_id()

    def set_workers(self, workers: list, steps_per_epoch: int, total_steps: int) -> None:
        """The worker actors this server drives in `run_steps`, in rank order."""
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
        carries the held-out evaluation (run here, so it sees exactly that step's parameters)."""
        import ray
        out = []
        for step in range(first, first + count):
            t0 = time.perf_counter()
            params = self._params_for_workers()
            results = ray.get([w.compute_gradients.remote(params, step) for w in self.workers])
            _, metrics = self.apply_gradients(step, *results)
            metrics["step_s"] = time.perf_counter() - t0
            if (step + 1) % self.steps_per_epoch == 0 or step + 1 == self.total_steps:
                metrics["evaluation"] = self.evaluate("test")
            out.append(metrics)
        return out

    def evaluate(self, split: str = "test") -> dict:
        """Loss (and accuracy) of the current parameters on a split, computed by worker 0."""
        import ray
        return ray.get(self.workers[0].evaluate.remote(self._params_for_workers(), split))

    def get_weights(self) -> np.ndarray:
        """The current flat parameters. Also starts the step clock: step 0's time counts from here."""
        self._last_apply = time.perf_counter()
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
        self.optimizer.update(self.flat.data, grad, prepare)
        self.step += 1
        loss_sum = sum(r[1]["loss_sum"] for r in results)
        correct = sum(r[1]["correct"] for r in results)
        now = time.perf_counter()
        metrics = {"step": step, "loss": loss_sum / max(count, 1), "count": count, "correct": correct,
                   "lr": self.optimizer.lr, "compute_s": max(r[1]["compute_s"] for r in results),
                   "apply_s": now - t0, "step_s": now - self._last_apply}
        self._last_apply = now
        return (self.flat.data if self._publish else step), metrics

    def get_state(self) -> dict:
        """Everything needed to resume: parameters, optimizer state, step."""
        return {"params": self.flat.data.copy(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def state_dict(self) -> dict:
        return dict(self.model.state_dict())


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


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (the actors are plain classes too)
        return "local"
