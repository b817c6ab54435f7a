"""Experiment trackers: TensorBoard event files and MLflow runs, as callbacks (callbacks.py).

`--tensorboard DIR` (TrainConfig.tensorboard) writes the run's event files in DIR/<the run
folder's name>, so `tensorboard --logdir DIR` shows each run as its own. `--mlflow URI`
(TrainConfig.mlflow) logs the run as one MLflow run in the experiment `--mlflow-experiment`:
URI is a tracking server (`http://host:port`), a database (`sqlite:///path.db`), or a folder,
which becomes an SQLite store `mlflow.db` with an `artifacts/` folder beside it.

What each shows, by tag (the step is the step's number as metrics.jsonl counts it, from 0):

    train/loss, train/lr, train/grad_norm, train/samples_per_s, train/accuracy (classification)
    time/step_ms, time/compute_ms, time/update_ms; worker<r>/compute_ms, worker<r>/wait_ms
    (how long worker r computed its share, and then waited for the slowest)
    test/loss, test/accuracy: each held-out evaluation, at the step it follows
    epoch/train_loss, epoch/train_accuracy: at each epoch's last step
    final/...: the summary's figures (train_loss, test_loss, accuracies, samples_per_s, wall_s)

A replayed step (a recovery, a resume) is not shown twice. TensorBoard is told to purge the
steps from the replay's first on (the events a `purge_step` writer starts with, which the
TensorBoard server honours), and they are written again. MLflow keeps a metric's history as
it was logged, so the MLflow callback leaves out the steps it has logged already: by the step
contract their numbers are the ones logged (timings apart), unless the steps are relaxed.

Neither can fail a run. An event file that cannot be written is one warning, and TensorBoard
logging stops. MLflow is reached from a thread of its own: the steps never wait on it. A
server that is down is one warning line and the records wait for it (up to MAX_PENDING of
them); at the end, a server that is up gets up to `flush_s` to take the rest, one that is
down two more tries.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from .callbacks import Callback
from .config import ConfigError

log = logging.getLogger(__name__)

MAX_PENDING = 200_000  # MLflow records (steps, evaluations) kept while the server is unreachable; older ones go


def scalars(record: dict) -> dict:
    """The tag -> value pairs a step or evaluation record shows (see the module's docstring)."""
    kind = record.get("kind")
    if kind == "step":
        out = {"train/loss": record["loss"], "train/lr": record["lr"],
               "train/samples_per_s": record["count"] / max(record["time_s"], 1e-12),
               "time/step_ms": 1e3 * record["time_s"], "time/compute_ms": 1e3 * record["compute_s"],
               "time/update_ms": 1e3 * record["apply_s"]}
        if "grad_norm" in record:
            out["train/grad_norm"] = record["grad_norm"]
        if "accuracy" in record:
            out["train/accuracy"] = record["accuracy"]
        compute = (record.get("timeline") or {}).get("compute") or []
        if compute:
            last = max(end for _, _, end in compute)
            for rank, start, end in compute:
                out[f"worker{rank}/compute_ms"] = 1e3 * (end - start)
                out[f"worker{rank}/wait_ms"] = 1e3 * (last - end)
        return out
    out = {"test/loss": record["test_loss"]}
    if "test_accuracy" in record:
        out["test/accuracy"] = record["test_accuracy"]
    if kind == "epoch":
        out["epoch/train_loss"] = record["train_loss"]
        if "train_accuracy" in record:
            out["epoch/train_accuracy"] = record["train_accuracy"]
    return out


FINAL = ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "samples_per_s", "wall_s", "median_step_ms")


def final_scalars(summary: dict) -> dict:
    return {f"final/{k}": float(summary[k]) for k in FINAL if isinstance(summary.get(k), (int, float))}


def hyperparameters(run) -> dict:
    """The run's settings as flat str/int/float/bool values (a list shown as text, None as 'none')."""
    out = {}
    for key, value in run.config.to_dict().items():
        if key in ("progress", "tensorboard", "mlflow", "mlflow_experiment", "out"):
            continue
        out[key] = value if isinstance(value, (bool, int, float, str)) else ("none" if value is None else
                                                                             json.dumps(value))
    out["workers"] = run.workers
    out["parameters"] = run.parameters
    return out


def run_name(run) -> str:
    """The run's name in the trackers: its folder's name."""
    return Path(run.config.out).name if run.config.out else f"run-{os.getpid()}-{int(time.time())}"


# --------------------------------------------------------------------------- checks before a run

def check(cfg) -> None:
    """ConfigError for tracker settings that cannot work, before anything starts: a TensorBoard
    folder that cannot be written, an MLflow URI of no form MLflow reads, or a missing package.
    (An MLflow server that does not answer is a warning when the run starts: MLflow.on_start.)"""
    if cfg.tensorboard:
        _writable("tensorboard", cfg.tensorboard)
        _need("tensorboardX", "tensorboard", "tracking")
    if cfg.mlflow:
        _need("mlflow", "mlflow", "tracking")
        uri = cfg.mlflow
        scheme = urlparse(uri).scheme
        if scheme in ("http", "https"):
            if not urlparse(uri).hostname:
                raise ConfigError(f"invalid mlflow: {uri!r} (no host: give http://host:port)", field="mlflow")
        elif scheme in ("sqlite", "postgresql", "mysql", "mssql", "databricks"):
            pass
        elif scheme in ("", "file"):
            _writable("mlflow", urlparse(uri).path if scheme == "file" else uri)
        else:
            raise ConfigError(f"invalid mlflow: {uri!r} (a tracking server's http(s)://host:port, a database "
                              "such as sqlite:///path.db, or a folder)", field="mlflow")


def _writable(field: str, folder: str) -> None:
    from .rundir import check_writable
    check_writable(Path(os.path.expanduser(folder)).absolute(), field)


def _need(module: str, field: str, extra: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"invalid {field}: needs the {module} package (pip install 'dptrain[{extra}]')",
                          field=field)


def _answers(uri: str, timeout: float = 3.0) -> bool:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:  # it answered
        return True
    except (OSError, ValueError):
        return False


def from_config(cfg) -> list:
    """The trackers cfg asks for, as callbacks."""
    out = []
    if cfg.tensorboard:
        out.append(TensorBoard(cfg.tensorboard))
    if cfg.mlflow:
        out.append(MLflow(cfg.mlflow, cfg.mlflow_experiment))
    return out


# --------------------------------------------------------------------------- TensorBoard

class TensorBoard(Callback):
    """Event files in `logdir`/<run name> (tensorboardX's writer: no TensorFlow, no PyTorch)."""

    def __init__(self, logdir: str, flush_secs: int = 10):
        self.logdir = os.path.abspath(os.path.expanduser(logdir))
        self.flush_secs = flush_secs
        self.writer = None
        self.path: str | None = None  # this run's folder of event files
        self._run = None
        self._last = -1

    def on_start(self, run) -> None:
        self._run = run
        self.path = os.path.join(self.logdir, run_name(run))
        # a resume continues the run's own event files: what it runs again is purged first
        self._open(purge=run.first_step if run.first_step > 0 else None)

    def _open(self, purge: int | None) -> None:
        from tensorboardX import SummaryWriter
        try:
            self.writer = SummaryWriter(self.path, purge_step=purge, flush_secs=self.flush_secs)
            if purge is not None:
                self.writer.flush()
        except OSError as e:
            self._lost(e)

    def _lost(self, e: Exception) -> None:
        log.warning("cannot write TensorBoard events in %s (%s): TensorBoard logging stops; training goes on",
                    self.path, getattr(e, "strerror", None) or e)
        self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass

    def _write(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        try:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        except OSError as e:
            self._lost(e)
        self._last = max(self._last, step)

    def on_step(self, record: dict) -> None:
        self._write(scalars(record), record["step"])

    on_evaluation = on_step

    def on_rewind(self, step: int, record: dict) -> None:
        if self.writer is not None and step <= self._last:  # what is run again is purged, then written anew
            self._close()
            self._open(purge=step)

    def on_end(self, result) -> None:
        if self.writer is None:
            return
        from tensorboardX.summary import hparams
        last = max(result.summary.get("steps", 1) - 1, 0)
        final = final_scalars(result.summary)
        try:
            for summary in hparams(hyperparameters(self._run), final):  # the HParams dashboard's session
                self.writer.file_writer.add_summary(summary)
            self._write(final, last)
        except (OSError, ValueError, TypeError) as e:
            log.warning("cannot write the run's hyperparameters to TensorBoard (%s)", e)
        self._close()

    def on_failure(self, error: BaseException) -> None:
        self._close()


# --------------------------------------------------------------------------- MLflow

def _store(uri: str) -> tuple:
    """(tracking URI, artifact location for a new experiment or None) of what --mlflow names."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        folder = Path(os.path.expanduser(urlparse(uri).path if scheme == "file" else uri)).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")
    return uri, None


class MLflow(Callback):
    """One MLflow run per training run (a resumed run continues its own: the run's id is kept in
    the run folder's mlflow.json), reached from a thread of its own."""

    RUN_FILE = "mlflow.json"

    def __init__(self, uri: str, experiment: str = "dptrain", flush_s: float = 30.0, retry_s: float = 2.0):
        self.uri, self.experiment = uri, experiment
        self.flush_s, self.retry_s = flush_s, retry_s
        self.run_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._logged = {"step": -1, "eval": -1}  # the last step of each kind logged: replays up to it are left out
        self._down = False
        self._failures = 0  # attempts that failed
        self._wake = threading.Event()  # ends a wait between attempts
        self._stop = False
        self._dropped = 0

    # ---- the driver's side: into the queue

    def on_start(self, run) -> None:
        # this thread retries, quietly: a request must not hold it for minutes (MLflow's default), nor
        # have urllib3 log a warning for each retry
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")):
            os.environ.setdefault(var, value)
        if urlparse(self.uri).scheme in ("http", "https") and not _answers(self.uri):
            self._down = True
            log.warning("the MLflow tracking server at %s does not answer: training goes on, and its records "
                        "wait for the server", self.uri)
        self._thread = threading.Thread(target=self._serve, args=(run,), name="dptrain-mlflow", daemon=True)
        self._thread.start()

    def on_step(self, record: dict) -> None:
        self._queue.put(("record", (record, int(time.time() * 1000))))

    on_evaluation = on_step

    def on_rewind(self, step: int, record: dict) -> None:
        self._queue.put(("tags", {"dptrain.replays": str(record.get("failures", 0)),
                                  "dptrain.last_replay_from_step": str(step)}))

    def on_end(self, result) -> None:
        self._queue.put(("end", result))
        self._join()

    def on_failure(self, error: BaseException) -> None:
        self._queue.put(("failed", "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"))
        self._join()

    def _join(self) -> None:
        if self._thread is None:
            return
        start, failures = time.monotonic(), self._failures
        self._wake.set()  # a server that is down gets two more tries now (a kept-alive connection to one
        # that restarted fails the first), and no more
        while self._thread.is_alive():
            waited = time.monotonic() - start
            if waited > self.flush_s or self._failures > failures + 1:
                self._stop = True
                log.warning("MLflow at %s did not take the run's last records within %.0f s: they are not "
                            "logged (training is done, and its run folder has everything)", self.uri, waited)
                return
            self._thread.join(0.05)

    # ---- the thread's side: the server

    def _serve(self, run) -> None:
        client = None
        records: list = []  # (record, time) not yet turned into metrics: that needs the run's history
        metrics: list = []  # metric tuples not yet logged
        tags: dict = {}
        end = None
        while end is None and not self._stop:
            items = [self._queue.get()]
            while True:  # whatever else is there: one batch
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for kind, value in items:
                if kind == "record":
                    records.append(value)
                elif kind == "tags":
                    tags.update(value)
                else:
                    end = (kind, value)
            if len(records) > MAX_PENDING:  # a long time down: the oldest go
                self._dropped += len(records) - MAX_PENDING
                records = records[-MAX_PENDING:]
            while not self._stop:
                try:
                    if client is None:
                        client = self._begin(run)
                    for record in records:
                        metrics.extend(self._metrics(*record))
                    records = []
                    self._send(client, metrics, tags)
                    tags = {}
                    if end is not None:
                        self._finish(client, run, *end)
                    if self._down:
                        self._down = False
                        log.info("MLflow at %s answers again: run %s is up to date", self.uri, self.run_id)
                    break
                except Exception as e:  # any failure of the tracker is the tracker's, never the run's
                    if self._stop:
                        return
                    self._failures += 1
                    if not self._down:
                        self._down = True
                        log.warning("MLflow at %s cannot be reached (%s): training goes on, and its records "
                                    "wait for the server", self.uri, _short(e))
                    if end is None and not self._queue.empty():
                        break  # take the newer records too, and try again with all of them
                    self._wake.wait(self.retry_s)
                    self._wake.clear()

    def _begin(self, run):
        """The client, its experiment and this training run's MLflow run (the same one on a resume)."""
        from mlflow.tracking import MlflowClient
        from . import __version__
        tracking, artifacts = _store(self.uri)
        client = MlflowClient(tracking_uri=tracking)
        found = client.get_experiment_by_name(self.experiment)
        experiment = found.experiment_id if found else client.create_experiment(self.experiment, artifacts)
        saved = self._saved_run_id(run)
        if saved:
            self.run_id = saved
            client.update_run(saved, status="RUNNING")
            client.set_tag(saved, "dptrain.workers", str(run.workers))  # a resume may run elsewhere
            client.set_tag(saved, "dptrain.cluster", run.address or "none")
            for kind, tag in (("step", "train/loss"), ("eval", "test/loss")):  # what it logged is not logged twice
                history = client.get_metric_history(saved, tag)
                self._logged[kind] = max([self._logged[kind]] + [m.step for m in history])
        else:
            tags = {"mlflow.runName": run_name(run), "dptrain.version": __version__,
                    "dptrain.workers": str(run.workers), "dptrain.cluster": run.address or "none",
                    "dptrain.dataset": run.dataset}
            self.run_id = client.create_run(experiment, tags=tags, run_name=run_name(run)).info.run_id
            self._save_run_id(run)
            params = hyperparameters(run)
            from mlflow.entities import Param
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])
        return client

    def _metrics(self, record: dict, at_ms: int) -> list:
        """The (tag, value, time, step) of a record, unless its step was logged already (a replay)."""
        kind, step = ("step" if record.get("kind") == "step" else "eval"), record["step"]
        if step <= self._logged[kind]:
            return []
        self._logged[kind] = step
        return [(tag, float(value), at_ms, step) for tag, value in scalars(record).items()]

    def _saved_run_id(self, run) -> str | None:
        if not run.config.out or run.first_step == 0:
            return None
        try:
            return json.loads((Path(run.config.out) / self.RUN_FILE).read_text()).get(self.uri)
        except (OSError, ValueError, AttributeError):
            return None

    def _save_run_id(self, run) -> None:
        if not run.config.out or not Path(run.config.out).is_dir():  # no run folder (dp.train_local)
            return
        path = Path(run.config.out) / self.RUN_FILE
        try:
            known = json.loads(path.read_text()) if path.exists() else {}
            known[self.uri] = self.run_id
            path.write_text(json.dumps(known) + "\n")
        except (OSError, ValueError) as e:
            log.warning("cannot write %s (%s): a resume will start a new MLflow run", path, e)

    def _send(self, client, metrics: list, tags: dict) -> None:
        """Log `metrics` (emptied as they are taken: a failure leaves what was not) and `tags`."""
        from mlflow.entities import Metric, RunTag
        while metrics:
            client.log_batch(self.run_id, metrics=[Metric(*m) for m in metrics[:1000]])  # MLflow's limit per batch
            del metrics[:1000]
        if tags:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _finish(self, client, run, kind: str, value) -> None:
        if kind == "end":
            result = value
            from mlflow.entities import Metric
            now, last = int(time.time() * 1000), max(result.summary.get("steps", 1) - 1, 0)
            client.log_batch(self.run_id, metrics=[Metric(k, v, now, last)
                                                   for k, v in final_scalars(result.summary).items()])
            self._artifacts(client, run, result)
            client.set_terminated(self.run_id, "FINISHED")
        else:
            client.set_terminated(self.run_id, value)
        if self._dropped:
            log.warning("MLflow run %s lacks the %d oldest records of the time %s was down", self.run_id,
                        self._dropped, self.uri)

    def _artifacts(self, client, run, result) -> None:
        """summary.json, config.json and params.npz: the run folder's, or written here without one."""
        folder = Path(run.config.out) if run.config.out else None
        with tempfile.TemporaryDirectory() as tmp:
            if folder is None or not (folder / "summary.json").exists():
                import numpy as np
                folder = Path(tmp)
                (folder / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
                (folder / "config.json").write_text(json.dumps(run.config.to_dict(), indent=2) + "\n")
                np.savez(folder / "params.npz", **result.params)
            for name in ("summary.json", "config.json", "params.npz"):
                if (folder / name).exists():
                    client.log_artifact(self.run_id, str(folder / name))


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
