"""Run folders on shared or object storage (`--storage URI`): the run's home off this machine.

The run folder is written locally as always (`--out`, or a temporary folder), so every
write, check and resume of rundir.py and checkpoint.py stays as it is; `Mirror`, a callback
on the driver, copies it to `URI/<the run folder's name>/` from a thread of its own, so a
step never waits on the storage:

- every checkpoint once it is whole: its .npz first, then its .json (with the .npz's size
  and SHA-256) last, the commit mark: a checkpoint exists on the storage once its JSON does,
  as on disk. Checkpoints pruned locally (`--keep-checkpoints`) are deleted there, JSON first;
- config.json at the start, metrics.jsonl with every checkpoint, and summary.json and
  params.npz (after the last checkpoint) at the end.

URIs: a path or `file://` (a shared filesystem: written under a temporary name and renamed),
or `s3://bucket/prefix`, with the endpoint, region and credentials from the usual AWS
variables (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or
the credential chain's other sources); an object is written whole or not at all. Through
pyarrow's filesystems.

A write is tried WRITE_TRIES times with backoff (an S3 request that has not answered in
REQUEST_TIMEOUT_S, or $DPTRAIN_STORAGE_TIMEOUT_S, failed); a checkpoint that still cannot be written is
one warning line and the run goes on, the storage's previous checkpoint still valid (the
next checkpoint tries again). `--resume URI/<name>` copies the run's config, metrics and
newest checkpoints into a local folder and resumes from there, from any machine.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path

from .callbacks import Callback
from .config import ConfigError

log = logging.getLogger(__name__)

WRITE_TRIES, BACKOFF_S = 4, 0.5  # 0.5, 1, 2 s between the tries: about 4 s of a storage hiccup absorbed
REQUEST_TIMEOUT_S = 20.0  # an object storage request that takes longer failed ($DPTRAIN_STORAGE_TIMEOUT_S)
END_WAIT_S = 120.0  # the end waits this long for what is queued (a live storage), then says what was not written
RUN_FILES = ("config.json", "metrics.jsonl", "vocab.json")
_CKPT = re.compile(r"^ckpt-(\d{8})\.json$")


def is_uri(value: str | None) -> bool:
    return bool(value) and "://" in value


class Storage:
    """A folder on a filesystem pyarrow reaches: `put`, `get`, `delete`, `list` of paths relative to it."""

    def __init__(self, uri: str):
        try:
            import pyarrow.fs as pafs
        except ImportError:
            raise ConfigError(f"invalid storage: {uri!r} needs pyarrow: pip install 'dptrain[data]'",
                              field="storage") from None
        self.uri = uri.rstrip("/")
        try:
            if self.uri.startswith("s3://"):
                bucket_path = self.uri[len("s3://"):]
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                timeout = float(os.environ.get("DPTRAIN_STORAGE_TIMEOUT_S") or REQUEST_TIMEOUT_S)
                self.fs = pafs.S3FileSystem(endpoint_override=endpoint, connect_timeout=min(5.0, timeout),
                                            request_timeout=timeout, background_writes=False,
                                            region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
                                            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
                self.root, self.local = bucket_path.strip("/"), False
            elif self.uri.startswith("file://") or "://" not in self.uri:
                path = self.uri[len("file://"):] if self.uri.startswith("file://") else self.uri
                self.fs, self.root, self.local = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), True
            else:
                raise ConfigError(f"invalid storage: {uri!r} (expected a path, file://PATH or s3://BUCKET/PREFIX)",
                                  field="storage")
        except (ValueError, OSError) as e:
            raise ConfigError(f"invalid storage: {uri!r} ({_first_line(e)})", field="storage") from None
        if not self.root:
            raise ConfigError(f"invalid storage: {uri!r} names no bucket", field="storage")

    def child(self, name: str) -> "Storage":
        s = object.__new__(Storage)
        s.uri, s.fs, s.root, s.local = f"{self.uri}/{name}", self.fs, f"{self.root}/{name}", self.local
        return s

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def check(self) -> None:
        """ConfigError unless this process can write here: a bucket that does not exist, missing
        or refused credentials, a path that cannot be written are named (one probe object,
        written and removed)."""
        probe = f".dptrain-probe-{os.getpid()}"
        try:
            if self.local:
                self.fs.create_dir(self.root, recursive=True)
            self.put_bytes(probe, b"", tries=1)
            self.fs.delete_file(self._path(probe))
        except OSError as e:
            text = _first_line(e)
            if "NO_SUCH_BUCKET" in text or "does not exist" in text.lower():
                bucket = self.root.split("/")[0]
                raise ConfigError(f"invalid storage: {self.uri}: the bucket {bucket!r} does not exist", field="storage") from None
            if not self.local and not _credentials_configured():
                raise ConfigError(f"invalid storage: {self.uri}: no AWS credentials are set (AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials) and the storage refused "
                                  f"a request without them ({text})", field="storage") from None
            if any(code in text for code in ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID")):
                raise ConfigError(f"invalid storage: {self.uri}: the storage refused the credentials ({text})",
                                  field="storage") from None
            raise ConfigError(f"invalid storage: cannot write to {self.uri} ({text})", field="storage") from None

    def put_bytes(self, rel: str, data: bytes, tries: int = WRITE_TRIES) -> None:
        """Write `rel` whole or not at all: on a filesystem a temporary name renamed, on object storage
        one object. Tried `tries` times with backoff; the last OSError raised."""
        path = self._path(rel)
        for attempt in range(tries):
            try:
                if self.local:
                    self.fs.create_dir(os.path.dirname(path), recursive=True)
                    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.tmp"
                    with self.fs.open_output_stream(tmp) as f:
                        f.write(data)
                    self.fs.move(tmp, path)
                else:
                    with self.fs.open_output_stream(path) as f:
                        f.write(data)
                return
            except OSError:
                if attempt == tries - 1:
                    raise
                time.sleep(BACKOFF_S * 2 ** attempt)

    def put_file(self, rel: str, local: Path, tries: int = WRITE_TRIES) -> None:
        self.put_bytes(rel, Path(local).read_bytes(), tries)

    def get_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self._path(rel))
        except (OSError, FileNotFoundError):
            pass

    def list(self, rel: str) -> list:
        """Names of the files directly in `rel` (none if it does not exist)."""
        import pyarrow.fs as pafs
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        except OSError:
            return []
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def _credentials_configured() -> bool:
    """Whether this process has AWS credentials from the environment or the usual files (an instance
    role, which has neither, still works: this only decides how a refusal is explained)."""
    env = os.environ
    if (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")) or env.get("AWS_PROFILE") \
            or env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", env.get("AWS_CONFIG_FILE") or "~/.aws/config"]
    return any(os.path.isfile(os.path.expanduser(f)) for f in files)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class Mirror(Callback):
    """Copies a run folder to `storage` (module docstring) from a thread of its own, after the run
    folder (RunDir) has written each file."""

    def __init__(self, storage: Storage, local: Path, every: int = 0):
        self.storage, self.local = storage, Path(local)
        self.every = every  # the run's --checkpoint-every: the steps after which a new checkpoint can be covered
        self.sent: set = set()  # checkpoint stems on the storage
        self.queue: queue.Queue = queue.Queue()
        self.thread = None
        self.unwritten: set = set()  # files whose last write failed and none has succeeded since
        self.logged = 0  # steps 0 .. logged - 1 are in metrics.jsonl
        self._warned = False

    # the driver's side: queue work, never wait (but at the end)
    def on_start(self, run) -> None:
        self.sent = {m.group(0)[:-5] for name in self.storage.list("checkpoints") if (m := _CKPT.match(name))}
        self.thread = threading.Thread(target=self._loop, name="dptrain-storage", daemon=True)
        self.thread.start()
        self.queue.put(("files", RUN_FILES))

    def on_step(self, record: dict) -> None:
        if record.get("kind") != "step":
            return
        self.logged = max(self.logged, record["step"] + 1)
        # the server saves after every `every` steps (and at the end: on_end's sync), so the folder is
        # looked at only when the log has just covered such a step, not at every step
        if self.every and (record["step"] + 1) % self.every == 0 and self._new_checkpoints():
            self.queue.put(("sync", self.logged))

    def on_rewind(self, step: int, record: dict) -> None:
        self.logged = step  # the log holds the steps before `step` now

    def on_end(self, result) -> None:
        self.queue.put(("sync", None))
        self.queue.put(("files", ("metrics.jsonl", "summary.json", "params.npz")))
        self._finish("its results")

    def on_failure(self, error: BaseException) -> None:
        self.queue.put(("sync", self.logged))  # what a resume from the storage needs
        self._finish("its newest checkpoint")

    def _new_checkpoints(self) -> bool:
        """Whether a checkpoint the log covers is not on the storage yet (the server checkpoints ahead
        of the driver's log, and a resume takes only a checkpoint the log covers)."""
        folder = self.local / "checkpoints"
        try:
            return any(m and m.group(0)[:-5] not in self.sent and int(m.group(1)) <= self.logged
                       for m in map(_CKPT.match, os.listdir(folder)))
        except OSError:
            return False

    def _finish(self, what: str) -> None:
        self.queue.put(("stop", None))
        if self.thread is None:
            return
        self.thread.join(END_WAIT_S)
        if self.thread.is_alive() or self.unwritten:
            log.warning("storage: %s could not write %s (%s); the run folder %s holds them",
                        self.storage.uri, ", ".join(sorted(self.unwritten)) or what,
                        "no answer" if self.thread.is_alive() else "after retries", self.local)

    # the thread's side
    def _loop(self) -> None:
        while True:
            kind, arg = self.queue.get()
            if kind == "stop":
                return
            try:
                self._sync(arg) if kind == "sync" else self._files(arg)
            except Exception as e:  # the run goes on: one line, the storage's last checkpoint still valid
                self._warn(f"storage: cannot write to {self.storage.uri} ({_first_line(e)}); training goes on, "
                           "and its newest checkpoint there is still valid")

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning(message)
            self._warned = True
        else:
            log.info(message)

    def _files(self, names) -> None:
        failed = []
        for name in names:
            path = self.local / name
            if path.is_file():
                try:
                    self.storage.put_file(name, path)
                except OSError:
                    failed.append(name)
                    continue
            self.unwritten.discard(name)
        self.unwritten.update(failed)
        if failed:
            raise OSError(f"{', '.join(failed)} not written")

    def _sync(self, logged: int | None) -> None:
        """The newest local checkpoint of at most `logged` steps (None: any) if the storage lacks it:
        metrics.jsonl (which covers it), its npz, then its json; checkpoints gone locally removed there."""
        folder = self.local / "checkpoints"
        try:
            stems = sorted(m.group(0)[:-5] for m in map(_CKPT.match, os.listdir(folder)) if m)
        except OSError:
            return
        covered = [st for st in stems if logged is None or int(st[5:]) <= logged]
        newest = covered[-1] if covered else None
        if newest is not None and newest not in self.sent:
            self.storage.put_file("metrics.jsonl", self.local / "metrics.jsonl")
            self.unwritten.discard("metrics.jsonl")  # an earlier failure to write it is made good
            try:
                self.storage.put_file(f"checkpoints/{newest}.npz", folder / f"{newest}.npz")
                self.storage.put_file(f"checkpoints/{newest}.json", folder / f"{newest}.json")  # the commit mark
            except FileNotFoundError:
                return  # pruned meanwhile: a newer one is there to take
            self.sent.add(newest)
            if self.unwritten:  # the storage answers again: what failed before goes too (config.json is
                self._files(sorted(self.unwritten))  # written once a run, and a resume from here needs it)
            if self._warned:
                log.info("storage: %s written again (checkpoint %s)", self.storage.uri, newest)
        for stem in sorted(self.sent - set(stems)):
            self.storage.delete(f"checkpoints/{stem}.json")  # the mark first: never a JSON without its npz
            self.storage.delete(f"checkpoints/{stem}.npz")
            self.sent.discard(stem)


def mirror(uri: str, local: Path, every: int = 0) -> Mirror | None:
    """The Mirror of run folder `local` to `uri`/<its name>; None when that is the folder itself (a run
    resumed in place from a shared path)."""
    target = Storage(uri).child(Path(local).name)
    if target.local and os.path.realpath(target.root) == os.path.realpath(local):
        return None
    return Mirror(target, local, every)


def fetch_run(uri: str) -> Path:
    """A local copy of the run at `uri` (config.json, metrics.jsonl, vocab.json and its newest
    intact checkpoints) in a new temporary folder named like the run; ConfigError if it holds none."""
    from .checkpoint import CheckpointError, read
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or "://" not in parent + "/":
        raise ConfigError(f"invalid resume: {uri!r} names no run folder (URI/<run name>)", field="resume")
    run = Storage(parent).child(name)
    try:
        if not run.exists("config.json"):
            raise ConfigError(f"invalid resume: {uri} holds no dptrain run (no config.json there)", field="resume")
        local = Path(tempfile.mkdtemp(prefix="dptrain-resume-")) / name
        (local / "checkpoints").mkdir(parents=True)
        for f in RUN_FILES:
            if run.exists(f):
                (local / f).write_bytes(run.get_bytes(f))
        from .rundir import RunDir
        logged = RunDir(str(local), append=True).steps_logged() or 0  # a resume takes one the log covers
        names = [n for n in run.list("checkpoints") if _CKPT.match(n) and int(_CKPT.match(n).group(1)) <= logged]
        for meta in sorted(names, reverse=True):  # the newest intact one is enough; older ones if it is not
            stem = meta[:-5]
            for suffix in (".npz", ".json"):
                (local / "checkpoints" / f"{stem}{suffix}").write_bytes(run.get_bytes(f"checkpoints/{stem}{suffix}"))
            try:
                read(local / "checkpoints" / meta)
                break
            except CheckpointError as e:
                log.warning("storage: %s/checkpoints/%s is damaged (%s); trying the one before", uri, meta, e)
    except OSError as e:
        raise ConfigError(f"invalid resume: cannot read {uri} ({_first_line(e)})", field="resume") from None
    return local
