"""Single-process training: one replica, one optimizer. The 1-worker baseline.

It runs the step contract (step.py) in one process: the replica's gradient of the
loss sum over the step's batch, divided once by the example count, then the
optimizer. The distributed trainer runs the same steps and must give the same
parameters. The building blocks both use (the data, the checked model and loss,
the optimizer and its schedule) are in blocks.py.
"""

from __future__ import annotations

import time

from . import trackers
from .blocks import as_dataset, build_optimizer, build_schedule, prepare, total_steps
from .callbacks import Callbacks, Progress, RunStart, Sink
from .config import TrainConfig
from .data import BatchSampler, Dataset
from .metrics import MetricsLog, TrainResult, reached_target, step_record, summary_record
from .models import ModelFactory
from .step import Replica, apply_mean_gradient, step_metrics

# --------------------------------------------------------------------------- the loop

class LocalLoop:
    """One replica and its optimizer, stepped in this process: the single-process loop that
    `train_local` runs, and that `dptrain scale` interleaves with the trainer's steps."""

    def __init__(self, cfg: TrainConfig, dataset: Dataset, factory: ModelFactory, loss, steps: int):
        self.replica = Replica(cfg, dataset, factory, loss)
        self.opt = build_optimizer(cfg, self.replica.model.parameters())
        self.sampler = BatchSampler(len(dataset), cfg.batch_size, cfg.seed)
        self.schedule = build_schedule(cfg, steps)
        self.max_norm = cfg.clip_grad_norm

    def step(self, step: int) -> dict:
        """One training step; its record, built as the distributed trainer builds its own (loss,
        count, lr, time_s, compute_s, apply_s, and accuracy when classifying)."""
        replica, opt = self.replica, self.opt
        t0 = time.perf_counter()
        loss_sum, correct, count = replica.compute_gradients(self.sampler.indices(step), step)
        t1 = time.perf_counter()
        norm = apply_mean_gradient(opt, [replica.flat.grad], max(count, 1), self.schedule(step), self.max_norm) ** 0.5
        t2 = time.perf_counter()
        metrics = {"loss_sum": loss_sum, "correct": correct, "count": count, "compute_s": t1 - t0}
        combined = dict(step_metrics(step, [metrics], opt.lr), step_s=t2 - t0, apply_s=t2 - t1, grad_norm=norm)
        return step_record(combined, self.sampler.steps_per_epoch, replica.task == "classification")

    def run(self, first: int, count: int) -> list:
        """Steps first .. first+count-1; their records."""
        return [self.step(step) for step in range(first, first + count)]


def train_local(cfg: TrainConfig, dataset: Dataset | None = None, sink=None, progress=None, *, model=None,
                loss=None, callbacks: list | None = None) -> TrainResult:
    """Train one replica in this process. Same steps, same numbers as N distributed workers.

    `model` (a callable returning a dp.nn.Module) and `loss` (a name, or a callable
    (output, target) -> the loss SUM) override cfg.model and cfg.loss (see dptrain.models).
    `callbacks`, `sink` and `progress` are told of the run as the Trainer tells them.
    """
    dataset = as_dataset(cfg, dataset)
    factory, loss_fn = prepare(cfg, dataset, model, loss)
    steps = total_steps(cfg, len(dataset))
    trackers.check(cfg)
    calls = Callbacks(Progress(progress) if progress else None, Sink(sink) if sink else None,
                      *trackers.from_config(cfg), *(callbacks or ()))
    try:
        result = _train(cfg, dataset, factory, loss_fn, steps, calls)
    except BaseException as e:
        calls.on_failure(e)
        raise
    calls.on_end(result)
    return result


def _train(cfg: TrainConfig, dataset: Dataset, factory: ModelFactory, loss_fn, steps: int,
           calls: Callbacks) -> TrainResult:
    loop = LocalLoop(cfg, dataset, factory, loss_fn, steps)
    replica, sampler = loop.replica, loop.sampler
    calls.on_start(RunStart(cfg, dataset.name, steps, sampler.steps_per_epoch, 1,
                            replica.model.num_parameters(), vocab=dataset.vocab))
    mlog = MetricsLog(cfg, steps, workers=1, callbacks=calls)
    start = time.perf_counter()
    for step in range(steps):
        rec = loop.step(step)
        mlog.step(rec)
        if (step + 1) % sampler.steps_per_epoch == 0 or step + 1 == steps:
            record = mlog.end_epoch(step // sampler.steps_per_epoch, step, _timed(replica.evaluation, "test"))
            if reached_target(cfg, record, mlog, time.perf_counter() - start):
                break
        elif cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            mlog.evaluation(step, _timed(replica.evaluation, "test"))
    wall = time.perf_counter() - start
    summary = summary_record(mlog, wall, _timed(replica.evaluation, "train", True),
                             _timed(replica.evaluation, "test", True))
    return TrainResult(cfg, {"steps": mlog.steps, "epochs": mlog.epochs, "evaluations": mlog.evaluations,
                             "summary": summary}, replica.model.state_dict())


def _timed(evaluate, split: str, final: bool = False) -> dict:
    """An evaluation's figures with the seconds it took (eval_s), as the server reports them."""
    t0 = time.perf_counter()
    return dict(evaluate(split, final), eval_s=time.perf_counter() - t0)
