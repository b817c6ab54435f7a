"""Callbacks, TensorBoard and MLflow: what a run tells the code and the tools watching it.

The tracker tests read what they wrote back through the tools' own servers and clients: a
TensorBoard server over HTTP, MLflow's client on its SQLite store and on a tracking server."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import dptrain as dp
from dptrain import cli
from dptrain.callbacks import Callbacks
from test_real_cluster import _free_port

BASE = dict(dataset="moons", model=[2, 16, 2], batch_size=32, steps=24, seed=3, dtype="float64", log_every=6)


class Recorder(dp.Callback):
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def on_start(self, run):
        self.calls.append(("start", run.first_step, run.steps, run.workers))

    def on_step(self, record):
        self.calls.append(("step", record["step"]))
        if record["step"] == self.fail_at:
            raise RuntimeError("a callback's own error")

    def on_evaluation(self, record):
        self.calls.append((record["kind"], record["step"]))

    def on_rewind(self, step, record):
        self.calls.append(("rewind", step, record["kind"]))

    def on_end(self, result):
        self.calls.append(("end", result.summary["steps"]))

    def on_failure(self, error):
        self.calls.append(("failure", type(error).__name__))


def test_callbacks_are_told_of_a_run_in_order():
    seen = Recorder()
    cfg = dp.TrainConfig(**dict(BASE, steps=30), eval_every=5)
    result = dp.train_local(cfg, callbacks=[seen])
    assert seen.calls[0] == ("start", 0, 30, 1) and seen.calls[-1] == ("end", 30)
    steps = [c[1] for c in seen.calls if c[0] == "step"]
    assert steps == list(range(30)) == [r["step"] for r in result.metrics["steps"]]
    told = [c for c in seen.calls if c[0] in ("eval", "epoch")]
    logged = sorted([("eval", r["step"]) for r in result.metrics["evaluations"]] +
                    [("epoch", r["step"]) for r in result.metrics["epochs"]], key=lambda c: c[1])
    assert told == logged and ("eval", 4) in told and ("epoch", 29) in told
    for kind, step in told:  # each right after its step
        assert seen.calls.index((kind, step)) == seen.calls.index(("step", step)) + 1


def test_a_failing_run_tells_each_callback_once_and_its_error_goes_on():
    first, second = Recorder(fail_at=4), Recorder()
    with pytest.raises(RuntimeError, match="a callback's own error"):
        dp.train_local(dp.TrainConfig(**BASE), callbacks=[first, second])
    assert first.calls[-1] == second.calls[-1] == ("failure", "RuntimeError")
    assert not any(c[0] == "end" for c in first.calls + second.calls)

    class BrokenEnd(dp.Callback):
        def on_end(self, result):
            raise OSError("no room for the last file")
    before, broken, after = Recorder(), BrokenEnd(), Recorder()
    with pytest.raises(OSError):  # the first was ended; those after the failing one are told of its failure
        Callbacks(before, broken, after).on_end(dp.TrainResult(dp.TrainConfig(), {"summary": {"steps": 1}}))
    assert before.calls == [("end", 1)] and after.calls == [("failure", "OSError")]
    with pytest.raises(TypeError, match="dptrain.Callback"):
        dp.train_local(dp.TrainConfig(**BASE), callbacks=[print])


@pytest.mark.parametrize("flags, message", [
    (["--tensorboard", "/etc/hostname/tb"], "invalid --tensorboard: cannot create /etc/hostname/tb (/etc/hostname is a file)"),
    (["--mlflow", "ftp://example/x"], "invalid --mlflow: 'ftp://example/x' (a tracking server's http(s)://host:port"),
    (["--mlflow", "http:///nowhere"], "invalid --mlflow: 'http:///nowhere' (no host"),
    (["--mlflow-experiment", " "], "invalid --mlflow-experiment: ' ' (an experiment's name)"),
])
def test_bad_tracker_settings_are_one_line_before_anything_starts(flags, message, tmp_path, capsys):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboardX")
    code = cli.main(["train", "--dataset", "moons", "--steps", "2", "--no-progress", "--out",
                     str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dptrain train: error: " + message), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_an_mlflow_server_that_does_not_answer_is_a_warning_and_the_run_trains(caplog):
    pytest.importorskip("mlflow")
    port = _free_port()  # nothing listens there
    caplog.set_level(logging.WARNING, logger="dptrain")
    t0 = time.monotonic()
    result = dp.train_local(dp.TrainConfig(**BASE, mlflow=f"http://127.0.0.1:{port}"))
    assert result.summary["steps"] == 24 and time.monotonic() - t0 < 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # at the start, and what the end could not log
    assert "does not answer: training goes on" in warnings[0] and "are not logged" in warnings[1]


# --------------------------------------------------------------------------- the tools' servers

def _wait_http(url: str, proc, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:2]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {seconds} s")


def _stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _tensorboard_scalars(logdir) -> dict:
    """{run: {tag: [(step, value), ...]}} as a TensorBoard server started on logdir serves them, and
    "hparams": the names of the settings its HParams tab shows."""
    exe = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(exe), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        port = None
        deadline = time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError("tensorboard exited")
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            port = m and int(m.group(1))
        base = f"http://127.0.0.1:{port}"
        out = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server reads the files in the background
            with urllib.request.urlopen(base + "/data/plugin/scalars/tags", timeout=10) as r:
                tags = json.loads(r.read())
            if tags and all("final/test_loss" in t for t in tags.values()):
                break
            time.sleep(0.5)
        for run, run_tags in tags.items():
            out[run] = {}
            for tag in run_tags:
                q = urllib.parse.urlencode({"run": run, "tag": tag})
                with urllib.request.urlopen(f"{base}/data/plugin/scalars/scalars?{q}", timeout=10) as r:
                    out[run][tag] = [(step, value) for _, step, value in json.loads(r.read())]
        request = urllib.request.Request(f"{base}/data/plugin/hparams/experiment", method="POST",
                                         data=b'{"experimentName": ""}', headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:  # the HParams tab's settings
            out["hparams"] = {h["name"] for h in json.loads(r.read()).get("hparamInfos", [])}
        return out
    finally:
        _stop(proc)


@pytest.mark.ray
@pytest.mark.slow
def test_tensorboard_and_mlflow_show_each_step_once_across_a_recovery_and_a_resume(ray_local, tmp_path):
    """A 2-worker run whose worker 1 dies at step 13 (the server runs the step again), then resumed
    from its checkpoint of step 8 (steps 8..23 run again): TensorBoard's server and MLflow's store
    show steps 0..23 once each, with the run's own numbers; one MLflow run, FINISHED, with its
    settings, tags and the run folder's files."""
    pytest.importorskip("tensorboard")
    MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient
    cfg = dp.TrainConfig(**BASE, workers=2, eval_every=6, checkpoint_every=8, out=str(tmp_path / "run"),
                         tensorboard=str(tmp_path / "tb"), mlflow=str(tmp_path / "mlflow"), mlflow_experiment="sweep")
    first = dp.Trainer(cfg, faults=[{"rank": 1, "step": 13, "kind": "exit"}]).fit()
    assert first.summary["failures_survived"] == 1
    resumed = dp.Trainer(cfg, resume=True, resume_at_most=8).fit()
    assert resumed.summary["resumed_from_step"] == 8
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if r["kind"] == "step"}  # the run's, each step once
    evals = {r["step"]: r["test_loss"] for r in logged if r["kind"] in ("eval", "epoch")}
    assert sorted(losses) == list(range(24))

    shown = _tensorboard_scalars(tmp_path / "tb")
    assert {"lr", "workers", "optimizer", "batch_size"} <= shown.pop("hparams")  # the settings in the HParams tab
    assert list(shown) == ["run"]  # the run folder's name
    tb = shown["run"]
    assert [s for s, _ in tb["train/loss"]] == list(range(24))
    assert [s for s, _ in tb["test/loss"]] == sorted(evals)
    np.testing.assert_allclose([v for _, v in tb["train/loss"]], [losses[s] for s in range(24)], rtol=1e-6)
    assert {"train/lr", "train/samples_per_s", "time/step_ms", "worker0/compute_ms", "worker1/wait_ms",
            "test/accuracy", "epoch/train_loss", "final/test_accuracy"} <= set(tb)
    assert tb["final/test_loss"][-1][1] == pytest.approx(resumed.summary["test_loss"], rel=1e-6)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued the run's own
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(24))
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)],
                               [losses[s] for s in range(24)], rtol=1e-12)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test/loss")) == sorted(evals)
    assert run.data.params["lr"] == "0.1" and run.data.params["workers"] == "2"
    assert run.data.tags["dptrain.workers"] == "2" and run.data.tags["dptrain.version"] == dp.__version__
    assert run.data.metrics["final/test_loss"] == pytest.approx(resumed.summary["test_loss"], rel=1e-12)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"summary.json", "config.json", "params.npz"}
    got = np.load(client.download_artifacts(run.info.run_id, "params.npz", str(tmp_path)))
    for k, v in resumed.params.items():
        np.testing.assert_array_equal(got[k], v)


@pytest.fixture
def mlflow_server(tmp_path):
    """An MLflow tracking server on 127.0.0.1 with an SQLite store; (url, start, stop), stopped
    after the test whatever happens."""
    pytest.importorskip("mlflow")
    exe = Path(sys.executable).with_name("mlflow")
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    procs = []

    def start():
        proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                                 "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"],
                                stdout=subprocess.DEVNULL, stderr=open(store / "server.log", "a"), start_new_session=True,
                                # no job runner: one process fewer, and no folder of its own left in /dev/shm
                                env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        procs.append(proc)
        _wait_http(f"http://127.0.0.1:{port}/health", proc)

    def kill():
        _stop(procs[-1])
    try:
        start()
        yield f"http://127.0.0.1:{port}", start, kill
    finally:
        for proc in procs:
            _stop(proc)


@pytest.mark.slow
def test_the_mlflow_server_killed_during_a_run_leaves_it_training(mlflow_server, caplog):
    """The tracking server is killed (SIGKILL, from outside) at step 10 and started again at step 40:
    the run never waits on it, says so in one warning line, and the server ends with every step
    of the run once, the run FINISHED."""
    MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient
    url, start, kill = mlflow_server

    client = MlflowClient(tracking_uri=url)

    def logged(experiment="outage"):
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        return runs and client.get_metric_history(runs[0].info.run_id, "train/loss")

    class Outage(dp.Callback):
        def on_step(self, record):
            if record["step"] == 10:  # once the server holds some of the run: mid-run
                deadline = time.monotonic() + 60
                while not logged() and time.monotonic() < deadline:
                    time.sleep(0.2)
                kill()
            elif record["step"] == 40:
                start()
    caplog.set_level(logging.INFO, logger="dptrain")
    result = dp.train_local(dp.TrainConfig(**dict(BASE, steps=60), mlflow=url, mlflow_experiment="outage"),
                            callbacks=[Outage()])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be reached" in warnings[0] and "training goes on" in warnings[0], warnings
    run = client.search_runs([client.get_experiment_by_name("outage").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(60))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json", "config.json", "params.npz"}
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [r["loss"] for r in result.metrics["steps"]]


# --------------------------------------------------------------------------- Ray Tune

@pytest.mark.parametrize("flags, message", [
    (["--lr", "loguniform:1e-1"], "invalid --lr: 'loguniform:1e-1' (loguniform:LOW:HIGH, two numbers)"),
    (["--workers", "choice:"], "invalid --workers: 'choice:' (choice: needs values"),
    (["--lr", "normal:0:1"], "invalid --lr: 'normal:0:1' (unknown distribution 'normal': give uniform, loguniform"),
    (["--lr", "choice:0.1,-1"], "invalid --lr: 'choice:0.1,-1' gives -1.0, which it refuses (the learning rate must be > 0)"),
    (["--lr", "loguniform:0:1"], "invalid --lr: 'loguniform:0:1' (loguniform needs LOW > 0"),
    (["--out", "grid:a,b"], "invalid --out: 'grid:a,b' (the sweep's own setting"),
    (["--metric", "train_loss"], "invalid --metric: 'train_loss' (no evaluation reports it"),
    (["--samples", "0"], "invalid --samples: 0 (trials per point of the space"),
    (["--max-concurrent", "0"], "invalid --max-concurrent: 0 (trials at once"),
    (["--dataset", "regression", "--model", "4,8,1", "--metric", "test_accuracy"],
     "invalid --metric: 'test_accuracy' (no evaluation reports it: each reports test_loss for regression)"),
])
def test_a_bad_sweep_is_one_line_before_anything_starts(flags, message, tmp_path, capsys):
    pytest.importorskip("ray.tune")
    import ray
    was = ray.is_initialized()
    code = cli.main(["tune", "--dataset", "moons", "--steps", "4", "--out", str(tmp_path / "sweep"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("dptrain tune: error: " + message), err
    assert not (tmp_path / "sweep").exists() and ray.is_initialized() == was


def test_a_search_space_reads_as_tune_domains():
    from dptrain.sweep import parse_space, split_space
    argv, space = split_space(["tune", "--lr", "loguniform:1e-4:1e-1", "--workers=choice:1,2,4", "--seed", "3",
                               "--model", "choice:2,16,2;2,32,2", "--batch-size", "grid:32,64"])
    assert argv == ["tune", "--seed", "3"]
    domains = parse_space(space, dp.TrainConfig(dataset="moons"))
    assert domains["lr"].values == (1e-4, 1e-1) and domains["workers"].values == (1, 2, 4)
    assert domains["model"].values == ((2, 16, 2), (2, 32, 2)) and domains["batch_size"].kind == "grid"
    assert domains["workers"].to_tune().categories == [1, 2, 4]


@pytest.mark.ray
@pytest.mark.slow
def test_a_tune_sweep_stops_poor_trials_and_leaves_nothing_behind(ray_local, tmp_path):
    """Four trials (lr 0.3 and 0.001 by 1 and 2 workers) on the session's Ray with ASHA, one at a time:
    a 0.001 trial after a 0.3 one is stopped at its first evaluation. Afterwards no actor, placement
    group or shared-memory segment of the sweep is left, and the best trial's settings trained alone
    give its parameters bit for bit."""
    pytest.importorskip("ray.tune")
    import ray
    from dptrain.distributed.transport import shm

    def alive():  # (actors, placement groups) alive, from the GCS (the session's Ray has no dashboard)
        actors = {k for k, a in ray._private.state.actors().items() if a["State"] != "DEAD"}
        return actors, {k for k, g in ray.util.placement_group_table().items() if g["state"] != "REMOVED"}
    before_actors, before_groups = alive()
    before_segments = set(shm.names("dptrain-"))
    base = dp.TrainConfig(**dict(BASE, steps=None, epochs=3))
    result = dp.tune(base, {"lr": "grid:0.3,0.001", "workers": "grid:1,2"}, scheduler="asha", metric="test_accuracy",
                     mode="max", reduction_factor=2, max_concurrent=1, out=str(tmp_path / "sweep"), verbose=0)
    assert len(result.rows) == 4 and all(r["ended"] in ("done", "stopped early") for r in result.rows), result.rows
    assert any(r["ended"] == "stopped early" and r["config"]["lr"] == 0.001 for r in result.rows), result.table()
    assert result.best["config"]["lr"] == 0.3 and result.best["ended"] == "done"
    assert (tmp_path / "sweep" / "results.csv").exists()

    deadline = time.monotonic() + 30  # Tune ends its trial actors asynchronously
    while time.monotonic() < deadline:
        actors, groups = alive()
        left, groups = actors - before_actors, groups - before_groups
        if not left and not groups:
            break
        time.sleep(0.5)
    assert not left and not groups, (left, groups)
    assert set(shm.names("dptrain-")) - before_segments == set()  # a stopped 2-worker trial's were left here

    run = Path(result.best["run"])
    alone = dp.TrainConfig.from_dict({**json.loads((run / "config.json").read_text()), "out": str(tmp_path / "alone")})
    params = dp.Trainer(alone).fit().params
    trial = np.load(run / "params.npz")
    for k, v in params.items():
        np.testing.assert_array_equal(trial[k], v)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_whose_driver_was_killed_resumes_its_trial_from_its_checkpoint(tmp_path):
    """kill -9 of `dptrain tune` and its embedded Ray while a trial runs, then `dptrain tune
    --restore`: the trial goes on from the newest checkpoint the sweep's folder holds (Tune's
    own folder for the trial is a new one after a restore), logs each step once, and ends on
    the parameters of the same settings trained in one process."""
    pytest.importorskip("ray.tune")
    from dptrain import checkpoint
    root = Path(__file__).resolve().parent.parent
    sweep, steps = tmp_path / "sweep", 2500  # the first checkpoint reaches the sweep's folder some 500 steps in
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0.2"}  # Tune copies the trial's folder into the sweep's this often
    args = [sys.executable, "-m", "dptrain.cli", "tune", "--dataset", "moons", "--model", "2,16,2", "--batch-size", "32",
            "--steps", str(steps), "--checkpoint-every", "250", "--eval-every", "500", "--workers", "1", "--seed", "grid:3",
            "--scheduler", "fifo", "--metric", "test_loss", "--mode", "min", "--cpus", "2", "--quiet",
            "--out", str(sweep)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=root, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(checkpoint.list_checkpoints(c) for c in sweep.glob("trial_*/run/checkpoints")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        proc.wait()
    [run] = list(sweep.glob("trial_*/run"))
    assert not (run / "summary.json").exists(), "the trial ended before the sweep could be killed"
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "tune", "--restore", "--out", str(sweep), "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed_from_step"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if x["kind"] == "step"] == list(range(steps))  # each step once
    clean = dp.train_local(dp.TrainConfig(**{**json.loads((run / "config.json").read_text()), "out": None})).params
    trial = np.load(run / "params.npz")
    for k, v in clean.items():
        np.testing.assert_array_equal(trial[k], v)
