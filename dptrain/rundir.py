"""A run's folder: config.json first, metrics.jsonl as it goes, summary.json and params.npz
at the end, beside the server's checkpoints/. It belongs to the library (the CLI only
names it), so `dp.Trainer(cfg).fit()` with `cfg.out` writes what `dptrain train` writes,
from a user's own script as from a `ray job submit` job.

A path is resolved once, on the driver, before anything starts (`resolve_out`): the
server and the workers write their part of the folder from other processes, whose
working directory is not the driver's (on a `ray start` cluster, the folder where the
cluster was started), and a job's working directory may be gone once Ray starts.

Writes that fail (a full disk, a folder removed) raise `RunFolderError`, naming the
file and what is kept; a temporary file is never left behind.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .callbacks import Callback
from .checkpoint import write_atomic
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """A file of the run folder cannot be written; the message names it."""


def default_out() -> str:
    """runs/<date>-<time>-<pid> under the working directory (absolute)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return resolve_out(str(Path("runs") / f"{stamp}-{os.getpid()}"))


JOB_RESULTS = "~/dptrain-runs"  # where a Ray job's relative out goes ($DPTRAIN_RESULTS overrides; as scripts/submit.sh)


def in_uploaded_job() -> bool:
    """Whether this process is the driver of a Ray job that runs in an uploaded working directory
    (`ray job submit --working-dir`): Ray's temporary copy, shared by jobs of the same upload and
    garbage-collected by Ray, no place for results."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return bool(isinstance(job, dict) and (job.get("runtime_env") or {}).get("working_dir"))


def resolve_out(out: str) -> str:
    """`out` as an absolute path (`~` expanded), resolved against this process's working directory;
    in a Ray job's uploaded working directory, against $DPTRAIN_RESULTS (default ~/dptrain-runs)
    on the node that runs the job's driver (the head node, for `ray job submit`)."""
    path = os.path.expanduser(out)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if in_uploaded_job():
        base = os.path.expanduser(os.environ.get("DPTRAIN_RESULTS") or JOB_RESULTS)
        resolved = os.path.normpath(os.path.join(base, path))
        log.info("out %s is relative and this is a Ray job in an uploaded working directory (Ray removes it): "
                 "the run folder is %s", out, resolved)
        return resolved
    try:
        return os.path.normpath(os.path.join(os.getcwd(), path))
    except FileNotFoundError:
        raise ConfigError(f"invalid out: {out!r} is relative and this process's working directory no longer exists: "
                          "give an absolute path", field="out") from None


PROBE_BYTES = 4096  # what check_writable writes: one block


def check_writable(path: Path, field: str) -> None:
    """ConfigError (for setting `field`) unless `path` is a folder this process can write in, or
    one it can create: a file in the way, a parent it cannot write to, or a full disk (a block is
    written and synced: a resume on a full disk fails here, before Ray starts) is named."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"invalid {field}: {path} is a file, not a folder", field=field)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"invalid {field}: cannot create {path} ({probe} is a file)", field=field)
    try:
        with tempfile.TemporaryFile(dir=probe) as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"invalid {field}: cannot write to {probe} ({e.strerror or e})", field=field) from None


class RunDir(Callback):
    """The run's output folder, which belongs to one run.

    Made with the path only, checked (`check`) before anything starts; the folder and its
    files are created by `open`, called once the actors are up (`on_start`: the run folder
    is the run's first callback), so a run that cannot start leaves nothing behind.
    `append`: a resumed run's folder.
    """

    def __init__(self, path: str, append: bool = False):
        self.path = Path(resolve_out(path))
        self.append = append  # a resumed run appends: records of steps replayed after the checkpoint appear again
        self._metrics = None

    def check(self) -> None:
        """ConfigError for a path that cannot be this run's folder: a file, a folder that cannot
        be written, or (unless appending) the folder of another run."""
        path = self.path
        check_writable(path, "out")
        if not self.append and path.is_dir():
            found = [name for name in ("config.json", "metrics.jsonl", "checkpoints", "params.npz")
                     if (path / name).exists()]
            if found:
                raise ConfigError(f"invalid out: {path} already holds a run ({', '.join(found)}): "
                                  f"--resume {path} continues it; give another --out for a new run", field="out")

    def open(self, cfg: TrainConfig, vocab: str | None = None) -> None:
        """config.json (and a text dataset's `vocab`, for dptrain sample), and metrics.jsonl opened."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.append or not (self.path / "config.json").exists():
                write_atomic(self.path / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
            if vocab is not None:
                write_atomic(self.path / "vocab.json", (json.dumps({"vocab": vocab}) + "\n").encode())
            self._metrics = open(self.path / "metrics.jsonl", "a" if self.append else "w")
        except OSError as e:
            raise ConfigError(f"invalid out: cannot write to {self.path} ({e.strerror or e})", field="out") from None

    def record(self, rec: dict) -> None:
        """Append a record to metrics.jsonl."""
        path = self.path / "metrics.jsonl"
        try:
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
        except OSError as e:
            raise RunFolderError(f"cannot write {path} ({e.strerror or e}); the checkpoints in "
                                 f"{self.path / 'checkpoints'} are kept (--resume {self.path} continues)") from None

    def _records(self) -> list:
        """(line, record) of every whole line of metrics.jsonl (a killed run may leave the last one cut short)."""
        out = []
        try:
            lines = (self.path / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append((line, json.loads(line)))
            except ValueError:
                continue
        return out

    def steps_logged(self) -> int | None:
        """How many steps metrics.jsonl records without a gap (a resume takes a checkpoint of at most
        that step, so that every step stays logged: the server checkpoints ahead of the log); None
        when it records none."""
        steps = {r["step"] for _, r in self._records() if r.get("kind") == "step"}
        n = 0
        while n in steps:
            n += 1
        return n or None

    # ---- as the run's first callback (callbacks.py)

    def on_start(self, run) -> None:
        self.open(run.config, vocab=run.vocab)

    def on_step(self, record: dict) -> None:
        self.record(record)

    on_evaluation = on_step

    def on_rewind(self, step: int, record: dict) -> None:
        self.rewind(step)
        self.record(record)

    def on_end(self, result) -> None:
        self.finish(result)

    def on_failure(self, error: BaseException) -> None:
        self.close()

    def rewind(self, step: int) -> None:
        """Drop the step and epoch records of steps >= `step`: a run that goes back to an earlier
        step (a recovery, a resume) runs them again, so every step appears once in metrics.jsonl."""
        path = self.path / "metrics.jsonl"
        try:
            self._metrics.close()
            kept = [line for line, r in self._records()
                    if not (r.get("kind") in ("step", "epoch", "eval") and r.get("step", -1) >= step)]
            write_atomic(path, "".join(line + "\n" for line in kept).encode())
            self._metrics = open(path, "a")
        except OSError as e:
            raise RunFolderError(f"cannot write {path} ({e.strerror or e}); the checkpoints in "
                                 f"{self.path / 'checkpoints'} are kept (--resume {self.path} continues)") from None

    def finish(self, result) -> None:
        """summary.json and params.npz of a finished run."""
        self.close()
        for name, write in (("summary.json", lambda f: f.write((json.dumps(result.summary, indent=2) + "\n").encode())),
                            ("params.npz", lambda f: np.savez(f, **result.params))):
            try:
                write_atomic(self.path / name, write)
            except OSError as e:
                raise RunFolderError(f"cannot write {self.path / name} ({e.strerror or e}); the checkpoints in "
                                     f"{self.path / 'checkpoints'} are kept (--resume {self.path} continues from the "
                                     "newest)") from None

    def close(self) -> None:
        if self._metrics is not None and not self._metrics.closed:
            try:
                self._metrics.close()
            except OSError:  # what could not be flushed was reported by record
                pass
