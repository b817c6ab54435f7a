"""Training records: each step's, each epoch's, the run's summary, and the result `fit()` returns.

Both the single-process loop and the distributed trainer log through `MetricsLog`,
so metrics.jsonl and the log lines read the same whichever ran.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .callbacks import Callback
from .config import TrainConfig

log = logging.getLogger(__name__)


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
    """Collects step and epoch records, tells `callbacks` of each as it goes (callbacks.py: the
    run folder, trackers, the caller's), prints log lines. It owns replay: `rewind(step, record)`
    forgets the records of steps >= step (they are about to run again, after a failure or on a
    resume) and tells the callbacks (`on_rewind`: the run folder's metrics.jsonl keeps each
    step once)."""

    def __init__(self, cfg: TrainConfig, total: int, workers: int, callbacks: Callback | None = None):
        self.cfg, self.total, self.workers = cfg, total, workers
        self.steps: list = []
        self.epochs: list = []
        self.evaluations: list = []  # --eval-every's evaluations between epoch ends
        self.eval_s = 0.0  # seconds spent evaluating (replays included: they are time spent)
        self.callbacks = callbacks if callbacks is not None else Callback()  # told of every record
        self.target: dict | None = None  # when and where cfg.target_accuracy was reached
        self._window: list = []  # the steps since the last log line
        self._epoch: list = []  # the steps since the last epoch's end

    def rewind(self, step: int, record: dict) -> None:
        """Forget the records of steps >= `step`, in this log and the callbacks'; `record` says what
        sent the run back (a recovery, a resume)."""
        self.steps = [r for r in self.steps if r["step"] < step]
        self.epochs = [r for r in self.epochs if r["step"] < step]
        self.evaluations = [r for r in self.evaluations if r["step"] < step]
        self._window = [r for r in self._window if r["step"] < step]
        ended = self.epochs[-1]["step"] if self.epochs else -1  # the epoch whose end is replayed gets its steps back
        self._epoch = [r for r in self.steps if r["step"] > ended]
        self.callbacks.on_rewind(step, record)

    @property
    def epoch_open(self) -> bool:
        """Whether steps were logged since the last epoch's end."""
        return bool(self._epoch)

    @property
    def next_step(self) -> int:
        """The step after the last one logged (0: none yet): what the log holds without a gap."""
        return self.steps[-1]["step"] + 1 if self.steps else 0

    def step(self, record: dict) -> None:
        self.steps.append(record)
        self._window.append(record)
        self._epoch.append(record)
        self.callbacks.on_step({"kind": "step", **record})
        s = record["step"]
        if (s + 1) % self.cfg.log_every == 0 or s + 1 == self.total:
            w = self._window
            ms = 1e3 * sum(r["time_s"] for r in w) / len(w)
            rate = sum(r["count"] for r in w) / max(sum(r["time_s"] for r in w), 1e-12)
            loss = sum(r["loss"] * r["count"] for r in w) / max(sum(r["count"] for r in w), 1)
            log.info("step %6d | loss %.4f | %.1f ms/step | %s samples/s | workers %d",
                     s + 1, loss, ms, f"{rate:,.0f}", self.workers)
            self._window = []

    def end_epoch(self, epoch: int, step: int, evaluation: dict) -> dict:
        """Log the epoch that ends at `step` (its steps logged since the last one's end, and the
        held-out `evaluation`); its record."""
        record = epoch_record(epoch, step, self._epoch, evaluation)
        self._epoch = []
        self.eval_s += evaluation.get("eval_s", 0.0)
        self.epoch(record)
        return record

    def evaluation(self, step: int, evaluation: dict) -> dict:
        """Log an evaluation of the held-out split after `step` between epoch ends (--eval-every)."""
        record = {"step": step, "test_loss": evaluation["loss"]}
        if "accuracy" in evaluation:
            record["test_accuracy"] = evaluation["accuracy"]
        record["eval_s"] = evaluation.get("eval_s", 0.0)
        self.eval_s += record["eval_s"]
        self.evaluations.append(record)
        self.callbacks.on_evaluation({"kind": "eval", **record})
        acc = f" | test acc {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        log.info("eval after step %d | test loss %.4f%s", step + 1, record["test_loss"], acc)
        return record

    def epoch(self, record: dict) -> None:
        self.epochs.append(record)
        self.callbacks.on_evaluation({"kind": "epoch", **record})
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
    """The run's summary. `final_train` and `final_test` are the final evaluations
    (step.evaluation_plan says what they cover); eval_s is the time spent evaluating, the final
    evaluations included."""
    samples = sum(r["count"] for r in log_.steps)
    step_times = sorted(r["time_s"] for r in log_.steps)
    out = {"steps": len(log_.steps), "wall_s": wall_s, "samples_per_s": samples / max(wall_s, 1e-12),
           "median_step_ms": 1e3 * step_times[len(step_times) // 2] if step_times else 0.0,
           "train_loss": final_train["loss"], "test_loss": final_test["loss"],
           "eval_s": log_.eval_s + final_train.get("eval_s", 0.0) + final_test.get("eval_s", 0.0)}
    if "accuracy" in final_test:
        out["train_accuracy"] = final_train["accuracy"]
        out["test_accuracy"] = final_test["accuracy"]
    sent = [b for r in log_.steps for b in r.get("sent_bytes", [])]
    if sent:  # what a worker sent of its gradient per step (--compress changes it)
        out["sent_bytes_per_worker_step"] = sum(sent) / len(sent)
    if any("versions" in r for r in log_.steps):  # bounded staleness: how old the applied gradients were
        ages = Counter(r["step"] - v for r in log_.steps for _, _, v in r.get("versions", []))
        out["staleness_histogram"] = {str(age): ages[age] for age in sorted(ages)}
    if any("dropped" in r for r in log_.steps):  # backup workers: gradients left out, by rank
        dropped = Counter(rank for r in log_.steps for rank in r.get("dropped", []))
        out["dropped_by_rank"] = {str(rank): dropped[rank] for rank in sorted(dropped)}
    if log_.cfg.target_accuracy is not None:
        out["target_accuracy"] = log_.cfg.target_accuracy
        out.update(log_.target or {"time_to_target_s": None, "target_step": None, "target_epoch": None})
    return out


def step_record(server: dict, steps_per_epoch: int, classification: bool) -> dict:
    """The log's record of a step from the parameter server's metrics of it."""
    step = server["step"]
    rec = {"step": step, "epoch": step // steps_per_epoch, "loss": server["loss"], "count": server["count"],
           "lr": server["lr"], "time_s": server["step_s"], "compute_s": server["compute_s"],
           "apply_s": server["apply_s"]}
    if server.get("skipped"):
        rec["skipped"] = True
    for key in ("grad_norm", "sent_bytes", "timeline", "versions", "counted", "dropped"):  # the last three: relaxed
        if key in server:
            rec[key] = server[key]
    if classification:
        rec["correct"] = server["correct"]
        rec["accuracy"] = server["correct"] / max(server["count"], 1)
    return rec
