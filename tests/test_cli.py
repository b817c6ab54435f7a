"""`dptrain train` as a user runs it: flags, output files, and one-line errors with exit status 2."""

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest


from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = "tests/user_models.py"


def dptrain(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dptrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,message", [
    (["--workers", "0"], "invalid --workers: 0"),
    (["--workers", "4", "--batch-size", "3"], "invalid --batch-size: 3 (smaller than the 4 workers"),
    (["--lr", "0"], "invalid --lr: 0.0"),
    (["--lr", "-0.5"], "invalid --lr: -0.5"),
    (["--dataset", "mnist2d"], "unknown dataset 'mnist2d'"),
    (["--data", "/nonexistent/d.npz"], "data file not found: /nonexistent/d.npz"),
    (["--optimizer", "lbfgs"], "invalid --optimizer: 'lbfgs'"),
    (["--model", "40,x,10"], "invalid --model: '40,x,10' (expected layer sizes like 40,256,256,10, a built-in"),
    (["--model", "tests/nope.py:build"], "invalid --model: 'tests/nope.py:build': file tests/nope.py not found"),
    (["--model", f"{USER}:nothing"], f"invalid --model: '{USER}:nothing': {USER} has no 'nothing'"),
    (["--model", f"{USER}:raises"], f"invalid --model: {USER}:raises raised RuntimeError: this builder is broken"),
    (["--model", f"{USER}:returns_list"], "returned a list, not a dptrain.nn.Module"),
    (["--model", f"{USER}:wrong_outputs"], "shape (1, 13), does not fit the labels of shape (1,): expected (1, 10)"),
    (["--model", "cnn2d"], "invalid --model: cnn2d raised ValueError: cnn2d: needs inputs of shape (channels, "),
    (["--loss", f"{USER}:mean_loss"], "invalid --loss: mean_loss gave"),
    (["--loss", f"{USER}:vector_loss"], "invalid --loss: vector_loss returned shape (1,)"),
    (["--loss", "hinge"], "invalid --loss: 'hinge'"),
    (["--out", "/proc"], "invalid --out: cannot write to /proc"),
    (["--out", "/proc/version/run"], "invalid --out: cannot create /proc/version/run (/proc/version is a file)"),
    (["--out", __file__], "is a file, not a folder"),
    (["--gpus-per-worker", "1"], "invalid --gpus-per-worker: 1 (this machine has no GPU that cupy can use"),
    (["--device", "cuda"], "invalid --device: 'cuda' (this machine has no GPU that cupy can use"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--dataset", "moons", "--model", "3,8,2"], "takes 3 inputs but moons has 2 features"),
    (["--resume", "/nonexistent/run"], "invalid --resume: /nonexistent/run/config.json not found"),
    (["--on-worker-loss", "pray"], "invalid --on-worker-loss: 'pray' (restart or shrink)"),
    (["--straggler", "slow"], "invalid --straggler: 'slow' (expected RANK:FACTOR or random:FACTOR"),
    (["--workers", "2", "--straggler", "2:3"], "invalid --straggler: '2:3' (worker 2 of 2 (ranks 0 to 1))"),
    (["--step-timeout", "0"], "invalid --step-timeout: 0.0"),
    (["--staleness", "-1"], "invalid --staleness: -1.0 (a whole number of parameter versions >= 0, or inf)"),
    (["--staleness", "1.5"], "invalid --staleness: 1.5 (a whole number"),
    (["--staleness", "soon"], "argument --staleness: invalid float value: 'soon'"),
    (["--backup-workers", "-1"], "invalid --backup-workers: -1 (must be a whole number >= 0)"),
    (["--staleness", "2", "--backup-workers", "1"], "choose bounded staleness or backup workers, not both"),
    (["--backup-workers", "1", "--transport", "compiled_graph"], "invalid --transport: 'compiled_graph' (a "
                                                                  "compiled graph runs only the synchronous step"),
    (["--workers", "2", "--backup-workers", "1", "--straggler", "3:2"], "(worker 3 of 3 (ranks 0 to 2))"),
    (["--workers", "2", "--backup-workers", "1", "--batch-size", "2"], "smaller than the 3 worker replicas"),
    (["--compress", "zip"], "invalid --compress: 'zip' (expected none, fp16, bf16 or topk:RATIO"),
    (["--servers", "0"], "invalid --servers: 0 (must be a whole number >= 1)"),
    (["--servers", "two"], "argument --servers: invalid int value: 'two'"),
    (["--servers", "2", "--transport", "compiled_graph"], "invalid --transport: 'compiled_graph' (a compiled graph "
                                                          "reaches one server"),
    (["--servers", "2", "--staleness", "1"], "invalid --staleness: 1.0 (relaxed steps run on one server"),
    (["--compress", "topk:0.9"], "invalid --compress: 'topk:0.9' (expected none, fp16, bf16 or topk:RATIO with "
                                 "0 < RATIO <= 0.5"),
    (["--optimizer", "adamw", "--betas", "1,0.9"], "invalid --betas: '1,0.9' (two numbers in [0, 1) as B1,B2"),
    (["--optimizer", "adamw", "--betas", "0.9"], "invalid --betas: '0.9' (two numbers in [0, 1)"),
    (["--optimizer", "adam", "--betas", "a,b"], "invalid --betas: 'a,b' (two numbers in [0, 1)"),
    (["--betas", "0.9,0.99"], "invalid --betas: '0.9,0.99' (betas are Adam's and AdamW's, and the optimizer is sgd)"),
    (["--optimizer", "adam", "--eps", "0"], "invalid --eps: 0.0 (must be > 0)"),
    (["--optimizer", "adam", "--eps", "nan"], "invalid --eps: nan (must be > 0)"),
    (["--schedule", "cosine", "--lr", "0.1", "--min-lr", "0.5"], "invalid --min-lr: 0.5 (above the learning rate 0.1"),
    (["--min-lr", "0.01"], "invalid --min-lr: 0.01 (the cosine schedule's floor, and the schedule is constant)"),
    (["--micro-batch", "0"], "invalid --micro-batch: 0 (examples per forward and backward pass: a whole number >= 1)"),
    (["--eval-every", "0"], "invalid --eval-every: 0 (must be >= 1"),
    (["--clip-grad-norm", "0"], "invalid --clip-grad-norm: 0.0 (a finite norm > 0"),
    (["--clip-grad-norm", "-1"], "invalid --clip-grad-norm: -1.0 (a finite norm > 0"),
    (["--clip-grad-norm", "nan"], "invalid --clip-grad-norm: nan (a finite norm > 0"),
    (["--eval-batches", "-1"], "invalid --eval-batches: -1 (must be >= 1"),
    (["--micro-batch", "2.5"], "argument --micro-batch: invalid int value: '2.5'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = dptrain("train", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_address_without_cluster_fails_within_seconds():
    start = time.monotonic()
    r = dptrain("train", "--address", "127.0.0.1:1", "--dataset", "moons")
    assert r.returncode == 2 and "no Ray cluster answers there" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 20


def test_help_documents_every_flag():
    import dataclasses
    from dptrain.config import TrainConfig
    r = dptrain("train", "--help")
    assert r.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout, f.name


@pytest.mark.ray
def test_train_writes_its_outputs(tmp_path):
    """A user's model file (--model FILE:FN, a CNN) trained through the command: its log lines, and
    the run folder's config, metrics, summary and parameters."""
    out = tmp_path / "run"
    r = dptrain("train", "--dataset", "mnist1d", "--model", f"{USER}:build", "--workers", "2", "--epochs", "2",
                "--batch-size", "100", "--optimizer", "adam", "--lr", "0.01", "--log-every", "5", "--cpus", "2",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "done: 80 steps on 2 worker(s)" in r.stdout and "test acc" in r.stdout
    assert f"model {USER}:build" in r.stderr
    assert "step     10 | loss" in r.stderr and "samples/s | workers 2" in r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["workers"] == 2 and config["dataset"] == "mnist1d" and config["model"] == f"{USER}:build"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(80))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 80 and 0.1 < summary["test_accuracy"] <= 1
    with np.load(out / "params.npz", allow_pickle=False) as params:
        assert params["conv.weight"].shape == (6, 1, 3) and params["fc.weight"].shape == (10, 120)


def _a_finished_run(out, **settings):
    """A run folder with checkpoints, as dptrain train leaves it: trained in this process (on the
    session's Ray), since the command under test is the one after it."""
    import dptrain as dp
    dp.Trainer(dp.TrainConfig(dataset="moons", model=[2, 8, 2], steps=6, batch_size=50, checkpoint_every=2,
                              out=str(out), **settings)).fit()


@pytest.mark.ray
def test_resume_with_another_model_is_refused(ray_local, tmp_path):
    out = tmp_path / "run"
    _a_finished_run(out)
    config = json.loads((out / "config.json").read_text())
    config["model"] = "2,16,2"
    (out / "config.json").write_text(json.dumps(config))
    before = (out / "metrics.jsonl").read_text()
    r = dptrain("train", "--resume", str(out))
    assert r.returncode == 2, r.stderr
    assert "invalid --resume:" in r.stderr and "parameter 0 is '0.weight' (8, 2) float32 in one and '0.weight' " \
        "(16, 2) float32 in the other" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (out / "metrics.jsonl").read_text() == before


@pytest.mark.ray
def test_a_run_folder_belongs_to_one_run(ray_local, tmp_path):
    out = tmp_path / "run"
    _a_finished_run(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = dptrain("train", "--dataset", "moons", "--model", "2,8,2", "--steps", "6", "--batch-size", "50", "--seed",
                "7", "--out", str(out))  # another run into the same folder
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"invalid --out: {out} already holds a run (config.json, metrics.jsonl, checkpoints, params.npz): " \
           f"--resume {out} continues it" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing lost
    # a folder whose checkpoints another run wrote (its config.json replaced) is not resumed
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, seed=7)))
    r = dptrain("train", "--resume", str(out))
    assert r.returncode == 2 and "written by another run (seed 0 there, 7 here)" in r.stderr, r.stderr


@pytest.mark.ray
def test_the_token_ray_generates_for_a_private_instance_is_this_users_only(tmp_path):
    """Ray writes the token it generates for a local instance with the default umask (0644), and
    whoever reads it joins the instance and runs code as this user: a private instance's token
    ends up 0600 in a folder of 0700, even where the folder was there already, open to others."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = ("import os, ray; os.umask(0o022); from dptrain.distributed.cluster import connect; "
            "connect(None, num_cpus=1); ray.shutdown()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**env, "HOME": str(home)})
    assert r.returncode == 0, r.stderr[-2000:]
    token = home / ".ray" / "auth_token"
    assert token.is_file(), r.stderr[-2000:]  # Ray 2.60 generates one for a local instance
    assert oct(token.stat().st_mode & 0o777) == "0o600" and oct(token.parent.stat().st_mode & 0o777) == "0o700"


@pytest.mark.ray
def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    out = tmp_path / "never"
    r = dptrain("train", "--dataset", "moons", "--workers", "3", "--cpus", "2", "--out", str(out))
    assert r.returncode == 2 and "3 workers x 1 CPU = 3 CPUs, but the Ray cluster has 2 CPUs" in r.stderr, r.stderr
    assert not out.exists()


def test_the_python_api_does_not_restore_another_runs_checkpoints(tmp_path):
    import dptrain as dp
    from dptrain.config import ConfigError
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-00000004.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints\)"):
        dp.Trainer(dp.TrainConfig(dataset="moons", out=str(tmp_path))).fit()


@contextlib.contextmanager
def _driver(*args, ignore_sigint: bool = False):
    """`dptrain` (the installed command's entry point) in a process group of its own, killed with
    whatever it started when the test ends, however it ends. `ignore_sigint`: started as `cmd &`
    from a non-interactive shell starts it, with SIGINT ignored."""
    import signal
    def setup():
        os.setsid()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen([sys.executable, "-c", "import sys, dptrain_console; sys.exit(dptrain_console.main())",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=setup)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


@pytest.mark.parametrize("sig,code,said", [("SIGTERM", 143, "terminated (SIGTERM)"), ("SIGINT", 130, "interrupted")])
def test_sigterm_and_ctrl_c_stop_the_run_with_one_line(tmp_path, sig, code, said):
    """Mid-run. The driver is started with SIGINT ignored, as from `cmd &` in a script: it is
    restored, so SIGINT still stops it."""
    import signal
    run = tmp_path / "r"
    with _driver("train", "--dataset", "moons", "--workers", "1", "--epochs", "100000", "--cpus", "1",
                 "--no-progress", "--out", str(run), ignore_sigint=True) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"dptrain train: {said}") and "Traceback" not in err
    from dptrain.distributed.trainer import run_key
    mine = f"dptrain-{run_key(str(run))}-"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(mine)]  # its shared memory released


def _alive_in_group(pgid: int) -> list:
    """Processes of group `pgid` that still run (zombies waiting to be reaped do not)."""
    ps = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in ps.splitlines()
            if len(f := line.split(None, 3)) > 2 and f[1] == str(pgid) and not f[2].startswith("Z")]


def _importing_numpy(pid: int, timeout: float = 30.0) -> None:
    """Until process `pid` has mapped numpy's core extension: the command is past its entry point
    (whose handlers come first) and in the middle of its imports. (A fixed delay of 50 ms landed
    before the interpreter's own start-up on a loaded machine, where no program can handle it.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            return
        time.sleep(0.002)


@pytest.mark.parametrize("delay", ["imports", 0.6, 1.5])
def test_sigterm_at_start_up_is_one_line_and_143(tmp_path, delay):
    """SIGTERM while the command imports (numpy half loaded), while Ray starts (ray.init installs a
    handler of its own) and while the actors come up: exit 143 and one line of ours, no
    traceback, no stack dump, nothing left running."""
    import signal
    with _driver("train", "--dataset", "moons", "--epochs", "100000", "--cpus", "1", "--no-progress", "--quiet",
                 "--out", str(tmp_path / "r")) as proc:
        if delay == "imports":
            _importing_numpy(proc.pid)
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while (group := _alive_in_group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert proc.returncode == 143, err[-2000:]
    ours = [line for line in err.strip().splitlines() if line.startswith("dptrain")]
    assert len(ours) == 1 and "terminated (SIGTERM)" in ours[0], err[-2000:]
    assert "Traceback" not in err and "Stack trace" not in err and "*** " not in err, err[-2000:]
    assert not group, f"left running: {group}"


def test_a_signal_that_c_code_turned_into_another_error_is_still_the_signal(monkeypatch, capsys):
    """numpy's C extension imports `datetime` through PyCapsule_Import, which replaces an exception
    raised inside that import (SIGTERM's) with an ImportError of its own, and Ray's ray.get any
    KeyboardInterrupt (SIGTERM's too) with a plain one: the command still says it was terminated,
    in one line, with 143, and an error no signal caused still propagates."""
    import signal
    import dptrain_console as console

    def import_that_a_sigterm_hit():
        try:
            console._raise_terminated(signal.SIGTERM, None)
        except console.Terminated:  # what PyCapsule_Import did with it
            raise ImportError('PyCapsule_Import could not import module "datetime"') from None

    def ray_get_that_a_sigterm_hit():
        try:
            console._raise_terminated(signal.SIGTERM, None)
        except KeyboardInterrupt:  # what Ray's check_signals does with any KeyboardInterrupt
            raise KeyboardInterrupt() from None

    def import_that_fails():
        raise ImportError("no module named numpy")

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(console, "_raised", None)
    try:
        monkeypatch.setattr(console, "_load_cli", import_that_fails)
        with pytest.raises(ImportError, match="no module named numpy"):
            console.main([])
        monkeypatch.setattr(console, "_load_cli", import_that_a_sigterm_hit)
        assert console.main([]) == 143
        monkeypatch.setattr(console, "_load_cli", ray_get_that_a_sigterm_hit)
        assert console.main([]) == 143
        monkeypatch.setattr(console, "_load_cli", import_that_fails)  # the next command starts afresh
        with pytest.raises(ImportError, match="no module named numpy"):
            console.main([])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert capsys.readouterr().err.strip().splitlines() == ["dptrain: terminated (SIGTERM); nothing was started"] * 2


def test_model_that_does_not_fit_the_data_file(tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((64, 3)), y=np.arange(64) % 2)
    r = dptrain("train", "--data", str(npz), "--model", "3,4,1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "has 1 outputs but" in r.stderr and "2 classes" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--modes", "sync,ssp:0"], "invalid --modes: 'ssp:0' (expected sync, ssp:TAU with TAU >= 1 or inf"),
    (["--modes", "async"], "invalid --modes: 'async'"),
    (["--modes", "backup:x"], "invalid --modes: 'backup:x'"),
    (["--straggler", "4:3", "--workers", "4"], "invalid --straggler: '4:3' (worker 4 of 4"),
    (["--repeats", "0"], "invalid --repeats: 0"),
])
def test_stragglers_bad_input_is_one_line_and_exit_2(args, message):
    r = dptrain("stragglers", *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.parametrize("args,message", [
    (["--compress", "none,topk:2"], "invalid --compress: 'topk:2' (expected none, fp16, bf16 or topk:RATIO"),
    (["--servers", "0,2"], "invalid --servers: '0,2' (counts must be >= 1)"),
    (["--servers", "1,two"], "invalid --servers: '1,two' (expected a list like 1,2,4)"),
])
def test_scale_refuses_a_bad_compress_or_servers_setting(args, message):
    r = dptrain("scale", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.parametrize("service", ["http", "silent"])
def test_an_address_where_another_service_listens_is_refused_within_seconds(tmp_path, service):
    """A port that accepts connections but is no Ray GCS (a web server; a server that says nothing):
    Ray alone retries for ever. One line and exit 2 within 10 s, nothing written."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import http.server as h; h.ThreadingHTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler)"
            ".serve_forever()" if service == "http" else
            f"import socket, time; s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); "
            "c = s.accept(); time.sleep(60)")
    server = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        start = time.monotonic()
        r = dptrain("train", "--address", f"127.0.0.1:{port}", "--dataset", "moons", "--out", str(tmp_path / "run"),
                    timeout=60)
        assert time.monotonic() - start < 10
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        said = "it answered '<!DOCTYPE HTML>'" if service == "http" else "it said nothing within 3 s"
        assert f"127.0.0.1:{port}: something listens there, but not a Ray cluster's GCS" in r.stderr
        assert said in r.stderr
        assert not (tmp_path / "run").exists()
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("text,message", [
    ('{"lr": ', "config.json is unreadable (Expecting value"),
    ("[1, 2]", "config.json holds a JSON list, not a run's settings"),
    ('{"lr": 0.1, "colour": 3}', "config.json: unknown config field(s) ['colour']"),
    ('{"lr": "fast"}', "config.json: invalid lr: 'fast'"),
    ('{"workers": "two"}', "config.json: not a run's settings"),
])
def test_a_malformed_config_on_resume_is_one_line_naming_the_file(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    r = dptrain("train", "--resume", str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"invalid --resume: {tmp_path}/{message}" in r.stderr, r.stderr


def test_resume_compares_flags_as_the_config_reads_them(tmp_path):
    """`--resume DIR --betas 0.9,0.99` of a run saved with betas [0.9, 0.99] is the same setting
    (typed as text, stored as a list): accepted, with the placement flags applied; another
    value is refused naming it."""
    from dptrain.cli import _resumed_config
    from dptrain.config import ConfigError, TrainConfig
    saved = TrainConfig(dataset="moons", optimizer="adam", betas="0.9,0.99", model="2,8,2").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = _resumed_config(str(tmp_path), {"betas": "0.9,0.99", "model": [2, 8, 2], "workers": 3})
    assert (cfg.betas, cfg.workers, cfg.out) == ([0.9, 0.99], 3, str(tmp_path))
    with pytest.raises(ConfigError, match=r"--betas '0.9,0.95' \(\[0.9, 0.99\] in .*config.json\)"):
        _resumed_config(str(tmp_path), {"betas": "0.9,0.95"})
