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

        Returns (flat gradient as numpy, metrics): one message per worker per step.
        """
        try:
            t0 = time.perf_counter()
            self.replica.load_parameters(params)
            indices = self.sampler.shard(step, self.num_workers, self.rank)
            loss_sum, correct, count = self.replica.compute_gradients(indices)
            grad = backend.to_numpy(self.replica.flat.grad)
            for fault in self.faults:
                if fault["step"] == step:
                    grad = inject_fault(fault, grad, self.rank, step)
            return grad, {"loss_sum": loss_sum, "correct": correct, "count": count,
                          "compute_s": time.perf_counter() - t0}
        except Exception as e:
            raise WorkerError(f"worker {self.rank} failed at step {step}: {type(e).__name__}: {e}") from e

    def evaluate(self, params: np.ndarray, split: str = "test") -> dict:
        self.replica.load_parameters(params)
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

    def get_weights(self) -> np.ndarray:
        """The current flat parameters. Also starts the step clock: step 0's time counts from here."""
        self._last_apply = time.perf_counter()
        return self.flat.data

    def apply_gradients(self, step: int, *results):
        t0 = time.perf_counter()
        if step != self.step:
            raise RuntimeError(f"parameter server at step {self.step} was sent gradients for step {step}")
        grad = self.flat.grad
        count = sum(r[1]["count"] for r in results)
        np.copyto(grad, results[0][0])
        for g, _ in results[1:]:
            grad += g
        grad /= max(count, 1)
        self.optimizer.lr = self.schedule(step)
        self.optimizer.step()
        self.step += 1
        loss_sum = sum(r[1]["loss_sum"] for r in results)
        correct = sum(r[1]["correct"] for r in results)
        now = time.perf_counter()
        metrics = {"step": step, "loss": loss_sum / max(count, 1), "count": count, "correct": correct,
                   "lr": self.optimizer.lr, "compute_s": max(r[1]["compute_s"] for r in results),
                   "apply_s": now - t0, "step_s": now - self._last_apply}
        self._last_apply = now
        return self.flat.data, metrics

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
