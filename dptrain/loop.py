"""Single-process training: one replica, one optimizer. The 1-worker baseline.

It runs the step contract (step.py) in one process: the replica's gradient of the
loss sum over the step's batch, divided once by the example count, then the
optimizer. The distributed trainer runs the same steps and must give the same
parameters. The building blocks both use (the data, the checked model and loss,
the optimizer and its schedule) are here too.
"""

from __future__ import annotations

import logging
import time

from . import backend
from .config import ConfigError, TrainConfig
from .data import BatchSampler, Dataset, load_dataset
from .metrics import MetricsLog, TrainResult, epoch_record, reached_target, summary_record
from .models import ModelFactory, check, loss_function, model_factory
from .optim import OPTIMIZERS, Optimizer, Schedule
from .step import Replica, mean_gradient

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
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, betas=tuple(cfg.betas or (0.9, 0.999)), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * BatchSampler(num_examples, cfg.batch_size).steps_per_epoch


def build_schedule(cfg: TrainConfig, steps: int) -> Schedule:
    return Schedule(cfg.schedule, cfg.lr, total_steps=steps, warmup_steps=cfg.warmup,
                    step_size=cfg.step_size, gamma=cfg.gamma, min_lr=cfg.min_lr)


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
        loss_sum, correct, count = replica.compute_gradients(self.sampler.indices(step), step)
        mean_gradient([replica.flat.grad], count, out=replica.flat.grad)
        opt.lr = self.schedule(step)
        opt.step()
        rec = {"step": step, "epoch": step // self.sampler.steps_per_epoch, "loss": loss_sum / count, "count": count,
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
