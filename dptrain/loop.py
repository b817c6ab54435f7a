"""Single-process training: one replica, one optimizer. The 1-worker baseline.

`Replica` is the piece a distributed worker runs too: the model and its data,
computing the gradient of the SUM of per-example losses over a set of example
indices. Dividing by the example count happens once, where the gradients meet
(here, or in the parameter server), so N workers reproduce this loop exactly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .config import ConfigError, TrainConfig
from .data import BatchSampler, Dataset, load_dataset
from .models import ModelFactory, check, count_correct, loss_function, model_factory
from .nn import flatten, random as nn_random
from .nn.flat import aligned_zeros
from .optim import OPTIMIZERS, Optimizer, Schedule
from .tensor import Tensor, as_dtype, no_grad

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- building blocks

def load_data(cfg: TrainConfig) -> Dataset:
    if cfg.data is not None:
        kwargs = {}
        if cfg.label and cfg.data.lower().endswith(".csv"):
            kwargs["label"] = cfg.label
        if cfg.data.lower().endswith(".txt"):
            kwargs["seq_len"] = cfg.seq_len
        return load_dataset(path=cfg.data, seed=cfg.seed, **kwargs)
    return load_dataset(cfg.dataset)


def prepare(cfg: TrainConfig, dataset: Dataset, model=None, loss=None, gpus_on_cluster: bool = False) -> tuple:
    """The run's model factory and loss function, checked on the data before anything starts
    (models.check: a failing builder, outputs that do not fit the labels, a loss that is not a
    scalar sum are one ConfigError); so is a GPU run on a machine without one, unless the GPUs
    are a cluster's (`gpus_on_cluster`: the trainer joins one)."""
    factory = model_factory(cfg, dataset, model)
    loss_fn = loss_function(cfg, dataset, loss)
    check(factory, loss_fn, dataset, cfg.seed)
    if cfg.device == "cuda" and not gpus_on_cluster and not backend.gpu_available():
        field, value = ("gpus_per_worker", f"{cfg.gpus_per_worker:g}") if cfg.gpus_per_worker > 0 else \
            ("device", "'cuda'")
        raise ConfigError(f"invalid {field}: {value} (this machine has no GPU that cupy can use; pip install "
                          "'dptrain[gpu]' on a machine with one, or join a cluster with GPUs: --address)", field=field)
    if cfg.batch_size > len(dataset):
        log.warning("--batch-size %d is larger than the %d training examples: every step uses all %d",
                    cfg.batch_size, len(dataset), len(dataset))
    return factory, loss_fn


def build_optimizer(cfg: TrainConfig, params) -> Optimizer:
    if cfg.optimizer == "sgd":
        return OPTIMIZERS["sgd"](params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                 weight_decay=cfg.weight_decay)
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * BatchSampler(num_examples, cfg.batch_size).steps_per_epoch


def build_schedule(cfg: TrainConfig, steps: int) -> Schedule:
    return Schedule(cfg.schedule, cfg.lr, total_steps=steps, warmup_steps=cfg.warmup,
                    step_size=cfg.step_size, gamma=cfg.gamma)


class Replica:
    """A model replica with its copy of the data on its device.

    `compute_gradients(indices, step, first_position)` leaves the gradient of the summed
    loss in `self.flat.grad` and returns (loss_sum, correct, count). The forward pass
    runs in train mode inside nn.random's context for (seed, step, the examples'
    positions in the step's global batch), so dropout masks do not depend on which
    worker holds an example.
    """

    def __init__(self, cfg: TrainConfig, dataset: Dataset, factory: ModelFactory, loss):
        self.cfg = cfg
        self.task = dataset.task
        self.loss = loss
        self.model = factory()
        self.flat = self.model.flat()
        xp = backend.xp_for(cfg.device)
        dt = as_dtype(cfg.dtype)
        self.xp = xp
        self.x_train = xp.asarray(dataset.x_train, dtype=dt)
        self.y_train = xp.asarray(dataset.y_train if self.task == "classification" else dataset.y_train.astype(dt))
        self.x_test = xp.asarray(dataset.x_test, dtype=dt)
        self.y_test = xp.asarray(dataset.y_test if self.task == "classification" else dataset.y_test.astype(dt))

    def load_parameters(self, flat_params, start: int = 0, stop: int | None = None) -> None:
        """Copy a flat parameter array (numpy) into the model: one copy, no per-tensor work.
        `start` and `stop` copy only that range of it."""
        if flat_params.shape != self.flat.data.shape:
            raise ValueError(f"parameters of shape {flat_params.shape} do not fit this model's "
                             f"{self.flat.data.shape}")
        self.flat.data[start:stop] = self.xp.asarray(flat_params[start:stop])

    def bind_gradients(self, storage=None) -> None:
        """Let backward write the gradients into `storage`, a 1-D array laid out like the flat
        buffer (a shared-memory segment, say), instead of the model's own; None: a private
        buffer again. The parameters stay where they are."""
        if storage is None:
            storage = aligned_zeros(self.xp, self.flat.size, self.flat.data.dtype)
        self.flat = flatten(self.model.parameters(), data=self.flat.data, grad=storage, data_is_current=True)

    def compute_gradients(self, indices, step: int = 0, first_position: int = 0) -> tuple[float, float, int]:
        self.flat.zero_grad()
        count = len(indices)
        if count == 0:  # an empty shard contributes nothing
            return 0.0, 0, 0
        idx = self.xp.asarray(indices)
        x, y = self.x_train[idx], self.y_train[idx]
        self.model.train()
        with nn_random.context(self.cfg.seed, step, np.arange(first_position, first_position + count)):
            out = self.model(Tensor(x))
        loss = self.loss(out, y)
        loss.backward()
        correct = count_correct(out.data, y) if self.task == "classification" else 0
        return float(loss.data), correct, count

    def evaluate(self, split: str = "test") -> dict:
        """Mean loss (and accuracy for classification) over a whole split, in batches, in eval mode."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        total, correct, n = 0.0, 0, len(x)
        bs = self.cfg.eval_batch_size
        self.model.eval()
        try:
            with no_grad():
                for start in range(0, n, bs):
                    xb, yb = x[start:start + bs], y[start:start + bs]
                    out = self.model(Tensor(xb))
                    total += float(self.loss(out, yb).data)
                    if self.task == "classification":
                        correct += count_correct(out.data, yb)
        finally:
            self.model.train()
        result = {"loss": total / max(n, 1)}
        if self.task == "classification":
            result["accuracy"] = correct / max(n, 1)
        return result


# --------------------------------------------------------------------------- results

@dataclass
class TrainResult:
    """What `fit()` returns: plain-dict metrics and the final parameters."""

    config: TrainConfig
    metrics: dict = field(default_factory=dict)
    params: OrderedDict = field(default_factory=OrderedDict)

    def state_dict(self) -> OrderedDict:
        return OrderedDict((k, v.copy()) for k, v in self.params.items())

    @property
    def summary(self) -> dict:
        return self.metrics.get("summary", {})


class MetricsLog:
    """Collects step and epoch records, writes metrics.jsonl as it goes, prints log lines."""

    def __init__(self, cfg: TrainConfig, total: int, workers: int, sink=None):
        self.cfg, self.total, self.workers = cfg, total, workers
        self.steps: list = []
        self.epochs: list = []
        self.sink = sink  # a callable taking one record dict (the CLI writes metrics.jsonl)
        self.target: dict | None = None  # when and where cfg.target_accuracy was reached
        self._window: list = []

    def truncate(self, step: int) -> None:
        """Forget the records of steps >= `step` (they are about to be run again after a failure)."""
        self.steps = [r for r in self.steps if r["step"] < step]
        self.epochs = [r for r in self.epochs if r["step"] < step]
        self._window = [r for r in self._window if r["step"] < step]

    def step(self, record: dict) -> None:
        self.steps.append(record)
        self._window.append(record)
        if self.sink:
            self.sink({"kind": "step", **record})
        s = record["step"]
        if (s + 1) % self.cfg.log_every == 0 or s + 1 == self.total:
            w = self._window
            ms = 1e3 * sum(r["time_s"] for r in w) / len(w)
            rate = sum(r["count"] for r in w) / max(sum(r["time_s"] for r in w), 1e-12)
            loss = sum(r["loss"] * r["count"] for r in w) / max(sum(r["count"] for r in w), 1)
            log.info("step %6d | loss %.4f | %.1f ms/step | %s samples/s | workers %d",
                     s + 1, loss, ms, f"{rate:,.0f}", self.workers)
            self._window = []

    def epoch(self, record: dict) -> None:
        self.epochs.append(record)
        if self.sink:
            self.sink({"kind": "epoch", **record})
        acc = f" | test acc {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        log.info("epoch %3d | train loss %.4f | test loss %.4f%s", record["epoch"] + 1,
                 record["train_loss"], record["test_loss"], acc)


def epoch_record(epoch: int, step: int, window: list, evaluation: dict) -> dict:
    """An epoch's summary from its step records and the held-out evaluation."""
    n = sum(r["count"] for r in window)
    rec = {"epoch": epoch, "step": step, "train_loss": sum(r["loss"] * r["count"] for r in window) / max(n, 1)}
    if window and "correct" in window[0]:
        rec["train_accuracy"] = sum(r["correct"] for r in window) / max(n, 1)
    rec["test_loss"] = evaluation["loss"]
    if "accuracy" in evaluation:
        rec["test_accuracy"] = evaluation["accuracy"]
    return rec


def reached_target(cfg: TrainConfig, record: dict, log_: MetricsLog, elapsed_s: float) -> bool:
    """True (and noted in the log) when an epoch's test accuracy reaches cfg.target_accuracy."""
    if cfg.target_accuracy is None or record.get("test_accuracy", 0.0) < cfg.target_accuracy:
        return False
    log_.target = {"time_to_target_s": elapsed_s, "target_step": record["step"], "target_epoch": record["epoch"]}
    log.info("reached test accuracy %.4f >= %.4f at step %d after %.1f s", record["test_accuracy"],
             cfg.target_accuracy, record["step"] + 1, elapsed_s)
    return True


def summary_record(log_: MetricsLog, wall_s: float, final_train: dict, final_test: dict) -> dict:
    samples = sum(r["count"] for r in log_.steps)
    step_times = sorted(r["time_s"] for r in log_.steps)
    out = {"steps": len(log_.steps), "wall_s": wall_s, "samples_per_s": samples / max(wall_s, 1e-12),
           "median_step_ms": 1e3 * step_times[len(step_times) // 2] if step_times else 0.0,
           "train_loss": final_train["loss"], "test_loss": final_test["loss"]}
    if "accuracy" in final_test:
        out["train_accuracy"] = final_train["accuracy"]
        out["test_accuracy"] = final_test["accuracy"]
    if log_.cfg.target_accuracy is not None:
        out["target_accuracy"] = log_.cfg.target_accuracy
        out.update(log_.target or {"time_to_target_s": None, "target_step": None, "target_epoch": None})
    return out


# --------------------------------------------------------------------------- the loop

class LocalLoop:
    """One replica and its optimizer, stepped in this process: the single-process loop that
    `train_local` runs, and that `dptrain scale` interleaves with the trainer's steps."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, factory: ModelFactory, loss, steps: int):
        self.replica = Replica(cfg, dataset, factory, loss)
        self.opt = build_optimizer(cfg, self.replica.model.parameters())
        self.sampler = BatchSampler(len(dataset), cfg.batch_size, cfg.seed)
        self.schedule = build_schedule(cfg, steps)

    def step(self, step: int) -> dict:
        """One training step; its record (loss, count, lr, time_s, and accuracy when classifying)."""
        replica, opt = self.replica, self.opt
        t0 = time.perf_counter()
        loss, correct, count = replica.compute_gradients(self.sampler.indices(step), step)
        replica.flat.grad /= count
        opt.lr = self.schedule(step)
        opt.step()
        rec = {"step": step, "epoch": step // self.sampler.steps_per_epoch, "loss": loss / count, "count": count,
               "lr": opt.lr, "time_s": time.perf_counter() - t0}
        if replica.task == "classification":
            rec["correct"] = correct
            rec["accuracy"] = correct / count
        return rec

    def run(self, first: int, count: int) -> list:
        """Steps first .. first+count-1; their records."""
        return [self.step(step) for step in range(first, first + count)]


def train_local(cfg: TrainConfig, dataset: Dataset | None = None, sink=None, progress=None, *, model=None,
                loss=None) -> TrainResult:
    """Train one replica in this process. Same steps, same numbers as N distributed workers.

    `model` (a callable returning a dp.nn.Module) and `loss` (a name, or a callable
    (output, target) -> the loss SUM) override cfg.model and cfg.loss (see dptrain.models).
    """
    dataset = dataset if dataset is not None else load_data(cfg)
    factory, loss_fn = prepare(cfg, dataset, model, loss)
    steps = total_steps(cfg, len(dataset))
    loop = LocalLoop(cfg, dataset, factory, loss_fn, steps)
    replica, sampler = loop.replica, loop.sampler
    mlog = MetricsLog(cfg, steps, workers=1, sink=sink)
    window: list = []
    start = time.perf_counter()
    for step in range(steps):
        rec = loop.step(step)
        mlog.step(rec)
        window.append(rec)
        if progress:
            progress(step, rec)
        if (step + 1) % sampler.steps_per_epoch == 0 or step + 1 == steps:
            record = epoch_record(step // sampler.steps_per_epoch, step, window, replica.evaluate("test"))
            mlog.epoch(record)
            window = []
            if reached_target(cfg, record, mlog, time.perf_counter() - start):
                break
    wall = time.perf_counter() - start
    summary = summary_record(mlog, wall, replica.evaluate("train"), replica.evaluate("test"))
    return TrainResult(cfg, {"steps": mlog.steps, "epochs": mlog.epochs, "summary": summary},
                       replica.model.state_dict())
