"""Run folders on shared or object storage (--storage): a real S3-compatible server (moto's standalone
server) started on 127.0.0.1 and stopped after; a storage that stops answering mid-run; resumes
from the storage into another folder; bad storage named in one line."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dptrain as dp
from dptrain.config import ConfigError
from dptrain.storage import Storage, fetch_run

ROOT = Path(__file__).resolve().parent.parent
RUN = dict(dataset="moons", model=[2, 16, 2], batch_size=50, steps=60, checkpoint_every=5, dtype="float64", seed=3,
           lr=0.1, momentum=0.9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """moto's S3 server on a free port, with a bucket `runs`; this process's AWS variables point at it."""
    import boto3
    import pyarrow.fs as pafs
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3"))  # then requests are signed
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="dptrain")  # the three unsigned actions: a user, its key, its policy
        key = iam.create_access_key(UserName="dptrain")["AccessKey"]
        iam.put_user_policy(UserName="dptrain", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
               "DPTRAIN_STORAGE_TIMEOUT_S": "1"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir("runs")
        yield {"server": server, "env": env}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGCONT)
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


class _Freeze(dp.Callback):
    """Freezes the storage server (SIGSTOP) at one step, as a storage that stops answering, and
    lets it go on (SIGCONT) at a later one, once `given_up()` says the uploads gave up (however long
    their tries took on a loaded machine: at most a minute); the run's steps go on meanwhile."""

    def __init__(self, pid, at, until, given_up):
        self.pid, self.at, self.until, self.given_up, self.steps_while_frozen = pid, at, until, given_up, 0

    def on_step(self, record):
        if record["step"] == self.at:
            os.killpg(self.pid, signal.SIGSTOP)
        elif self.at < record["step"] < self.until:
            self.steps_while_frozen += 1
            time.sleep(0.4)  # a slower model's steps
        elif record["step"] == self.until:
            deadline = time.monotonic() + 60
            while not self.given_up() and time.monotonic() < deadline:
                time.sleep(0.2)
            os.killpg(self.pid, signal.SIGCONT)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


class _StopAt(dp.Callback):
    def __init__(self, step):
        self.step = step

    def on_step(self, record):
        if record["step"] == self.step:
            raise KeyboardInterrupt  # the driver stopped, as Ctrl-C does: no summary, no final parameters


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_s3_outlives_a_frozen_server_and_resumes_from_the_bucket_elsewhere(ray_local, s3, tmp_path):
    """The S3 server frozen from step 12 until an upload has given up (each try times out after 1 s,
    four tries), 11 s or more: the run goes on, one warning, the bucket's checkpoints catch up once it answers. The
    run stopped at step 50 is resumed from the bucket in another folder (another machine's): the
    fault-free parameters, each step logged once, everything in the bucket."""
    lines, logger = _Lines(), logging.getLogger("dptrain.storage")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)

    def warned():
        return [r.getMessage() for r in lines.records if r.levelno == logging.WARNING]
    freeze = _Freeze(s3["server"].pid, at=12, until=40, given_up=lambda: bool(warned()))
    cfg = dp.TrainConfig(workers=2, out=str(tmp_path / "here" / "run1"), storage="s3://runs/team", **RUN)
    try:
        with pytest.raises(KeyboardInterrupt):
            dp.Trainer(cfg, callbacks=[freeze, _StopAt(50)]).fit()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert freeze.steps_while_frozen == 27  # the steps never waited for the storage
    warnings = warned()
    assert len(warnings) == 1 and "training goes on, and its newest checkpoint there is still valid" in warnings[0]
    bucket = Storage("s3://runs/team/run1")
    stored = [n for n in bucket.list("checkpoints") if n.endswith(".json")]
    assert stored and int(stored[-1][5:13]) >= 45  # caught up after the freeze
    local = fetch_run("s3://runs/team/run1")  # what --resume s3://... does first (the CLI's: test_faults.py)
    assert local.name == "run1" and not str(local).startswith(str(tmp_path))
    resumed = dp.TrainConfig.from_dict(json.loads((local / "config.json").read_text())).replace(out=str(local))
    assert resumed.storage == "s3://runs/team"
    result = dp.Trainer(resumed, resume=True).fit()
    assert 0 < result.summary["resumed_from_step"] <= 50
    clean = dp.train_local(dp.TrainConfig(**RUN)).params
    with np.load(__import__("io").BytesIO(bucket.get_bytes("params.npz"))) as f:
        assert max(float(np.abs(f[k] - clean[k]).max()) for k in clean) < 1e-10
    records = [json.loads(line) for line in bucket.get_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(RUN["steps"]))
    assert json.loads(bucket.get_bytes("summary.json"))["steps"] == RUN["steps"]


def test_bad_storage_is_named(s3, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"invalid storage: s3://nobucket/x: the bucket 'nobucket' does not exist"):
        Storage("s3://nobucket/x").check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ConfigError, match=r"invalid storage: s3://runs/x: the storage refused the credentials "
                                          r"\(.*SIGNATURE_DOES_NOT_MATCH"):
        Storage("s3://runs/x").check()
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"invalid storage: s3://runs/x: no AWS credentials are set"):
        Storage("s3://runs/x").check()
    with pytest.raises(ConfigError, match=r"invalid storage: 'ftp://host/x' \(expected a path, file://PATH or s3://"):
        Storage("ftp://host/x")
    with pytest.raises(ConfigError, match=r"invalid resume: file://.*/none holds no dptrain run \(no config.json"):
        fetch_run(f"file://{tmp_path}/none")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"invalid storage: cannot write to .*afile/sub"):
        Storage(str(tmp_path / "afile" / "sub")).check()


def test_the_cli_refuses_a_missing_bucket_in_one_line_before_ray_starts(s3, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--dataset", "moons", "--storage",
                        "s3://nobucket/runs", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env=dict(os.environ, **s3["env"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid --storage: s3://nobucket/runs/run: the bucket 'nobucket' does not exist" \
        in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


class _Flaky:
    """A storage (Mirror's view of it) that fails every write of the names in `failing` until cleared."""

    uri = "flaky://runs/run1"

    def __init__(self):
        self.failing, self.written = {"metrics.jsonl"}, []

    def list(self, folder):
        return []

    def put_file(self, name, path):
        if name in self.failing:
            raise OSError(f"{name}: no answer")
        self.written.append(name)

    def delete(self, name):
        pass


def test_a_file_written_after_a_failed_write_is_not_reported_unwritten(tmp_path, caplog):
    """metrics.jsonl and config.json fail at the start (the storage froze) and are written with the
    next checkpoint (config.json is written once a run, and a resume from the storage needs it):
    the run's end reports nothing unwritten. A file that never got written is still named."""
    from dptrain.storage import Mirror
    (tmp_path / "checkpoints").mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / name).write_text("{}\n")
    storage = _Flaky()
    storage.failing = {"metrics.jsonl", "config.json"}
    mirror = Mirror(storage, tmp_path, every=5)
    with caplog.at_level(logging.INFO, logger="dptrain.storage"):
        mirror.on_start(None)
        deadline = time.monotonic() + 10
        while len(mirror.unwritten) < 2 and time.monotonic() < deadline:  # the start's writes have failed
            time.sleep(0.01)
        assert mirror.unwritten == {"metrics.jsonl", "config.json"}
        storage.failing = {"summary.json"}  # answers again, but for one file
        for suffix in ("npz", "json"):
            (tmp_path / "checkpoints" / f"ckpt-00000005.{suffix}").write_text("x")
        (tmp_path / "summary.json").write_text("{}")
        mirror.on_step({"kind": "step", "step": 4})  # the log covers checkpoint 5: it goes, with the log
        mirror.on_end(None)
    assert storage.written.count("metrics.jsonl") == 2 and "checkpoints/ckpt-00000005.json" in storage.written
    assert storage.written.count("config.json") == 1
    ends = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert len(ends) == 1 and "could not write summary.json (after retries)" in ends[0], ends
