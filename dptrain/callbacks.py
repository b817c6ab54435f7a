"""Callbacks: what a run tells the code watching it, on the driver, as it goes.

    class Watch(dp.Callback):
        def on_step(self, record):
            print(record["step"], record["loss"])

    dp.Trainer(cfg, callbacks=[Watch()]).fit()      # dp.train_local(cfg, callbacks=[...]) too

A run calls, in this order:

- `on_start(run)` once the actors are up, before the first step: `run` is a `RunStart`
  (the config, the dataset, how many steps, the worker count, where they run, the step the
  run starts from: 0, or where a resume continues);
- `on_step(record)` for every step, `on_evaluation(record)` after every held-out evaluation
  (an epoch's end, `"kind": "epoch"`, or `--eval-every`'s, `"kind": "eval"`), with the records
  `metrics.jsonl` holds;
- `on_rewind(step, record)` when a recovery or a resume runs the steps from `step` on again
  (`record` says which, as metrics.jsonl's recovery and resume lines do): what was told of
  those steps no longer stands, and they are told again as they run. (The step contract
  makes a replayed step's numbers the ones first told, timings apart, unless the steps are
  relaxed.)
- `on_end(result)` with the `TrainResult` (its summary and final parameters) once the run's
  folder is complete; or `on_failure(error)` when the run ends in an exception (a failed
  run, Ctrl-C, SIGTERM), and then the exception goes on to the caller. Each callback is told
  one of the two.

A callback's exception is the run's (a tracker that must never fail a run catches its own:
the TensorBoard and MLflow callbacks in dptrain.trackers do), except in `on_failure`, where
it is logged and the run's own error goes on. The run folder (rundir.RunDir) and the CLI's
progress bar are callbacks too, called first, so `on_end` finds the folder's files written.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What `on_start` is told: the run as it starts."""

    config: object  # the TrainConfig (its `out` resolved to an absolute path)
    dataset: str  # the dataset's name
    steps: int  # the run's steps in all
    steps_per_epoch: int
    workers: int
    parameters: int  # the model's parameter count
    first_step: int = 0  # 0, or the step a resume continues from
    placement: tuple = ()  # per worker: {"rank", "node_id", ...} (empty in one process)
    address: str | None = None  # the Ray cluster's address (None in one process)
    vocab: str | None = None  # a text dataset's characters


class Callback:
    """Override the calls you need; each does nothing by default."""

    def on_start(self, run: RunStart) -> None:
        pass

    def on_step(self, record: dict) -> None:
        pass

    def on_evaluation(self, record: dict) -> None:
        pass

    def on_rewind(self, step: int, record: dict) -> None:
        pass

    def on_end(self, result) -> None:
        pass

    def on_failure(self, error: BaseException) -> None:
        pass


class Progress(Callback):
    """The `progress(step, record)` function of Trainer and train_local, as a callback."""

    def __init__(self, fn):
        self.fn = fn

    def on_step(self, record: dict) -> None:
        self.fn(record["step"], record)


class Sink(Callback):
    """A record sink (a callable taking each record dict, as `metrics.jsonl` holds it) as a
    callback: the `sink=` of Trainer and train_local. A sink with a `rewind(step)` method is
    told of every rewind before the record that says why."""

    def __init__(self, fn):
        self.fn = fn

    def on_step(self, record: dict) -> None:
        self.fn(record)

    on_evaluation = on_step

    def on_rewind(self, step: int, record: dict) -> None:
        if hasattr(self.fn, "rewind"):
            self.fn.rewind(step)
        self.fn(record)


class Callbacks(Callback):
    """Several callbacks as one, called in order (what metrics.MetricsLog tells of a run)."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]
        bad = [c for c in self.callbacks if not isinstance(c, Callback)]
        if bad:
            raise TypeError(f"callbacks must be dptrain.Callback instances; got {type(bad[0]).__name__}")

    def on_start(self, run: RunStart) -> None:
        for c in self.callbacks:
            c.on_start(run)

    def on_step(self, record: dict) -> None:
        for c in self.callbacks:
            c.on_step(record)

    def on_evaluation(self, record: dict) -> None:
        for c in self.callbacks:
            c.on_evaluation(record)

    def on_rewind(self, step: int, record: dict) -> None:
        for c in self.callbacks:
            c.on_rewind(step, record)

    def on_end(self, result) -> None:
        """Each callback's on_end in turn; when one raises (the run folder cannot write its last
        files), those after it are told of that failure instead, and it goes on to the caller."""
        for i, c in enumerate(self.callbacks):
            try:
                c.on_end(result)
            except BaseException as e:
                Callbacks(*self.callbacks[i + 1:]).on_failure(e)
                raise

    def on_failure(self, error: BaseException) -> None:
        for c in self.callbacks:
            try:
                c.on_failure(error)
            except Exception as e:  # the run's own error is the one that matters
                log.warning("callback %s failed in on_failure: %s", type(c).__name__, e)
