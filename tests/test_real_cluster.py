"""A real `ray start` cluster (cluster/start.sh): job submission with scripts/submit.sh, and --address."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray declares a node dead once its health checks fail: 5 checks 3 s apart by default, about 15 s
# of a test that kills a node. Ray's settings for a check every second, 3 times, which a cluster's
# operator may choose as well; dptrain handles the loss the same way whenever Ray reports it.
NODE_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}


def _env():
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the venv's ray
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    return env


@contextlib.contextmanager
def started_cluster(nodes: int = 1, prefix: str = "dpt-", env: dict | None = None):
    """A cluster/start.sh cluster (head of 2 CPUs, `nodes` worker nodes of 1 CPU), stopped after;
    `env`: more variables for its `ray start`s (NODE_HEALTH_CHECK)."""
    import ray
    ray.shutdown()  # only the cluster under test runs while it does
    state = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = _free_port(), _free_port()
    try:
        start = subprocess.run([str(ROOT / "cluster/start.sh"), "--nodes", str(nodes), "--cpus", "2", "--port",
                                str(port), "--dashboard-port", str(dash), "--state", state],
                               capture_output=True, text=True, env={**_env(), **(env or {})}, timeout=180)
        assert start.returncode == 0, start.stderr + start.stdout
        yield {"state": state, "port": port, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        stop = subprocess.run([str(ROOT / "cluster/stop.sh"), "--state", state], capture_output=True, text=True,
                              timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def cluster():
    """One cluster for this module: jobs, joins, and last the tests that kill or freeze a single
    process (the nodes outlive it, so each test finds the cluster as a user would after the last
    one recovered). Something holds Ray's default job-agent port (52365) while it starts, as
    another Ray instance or an orphaned agent may (test_submit_job_and_read_its_results)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("0.0.0.0", 52365))
        holder.listen(1)
    except OSError:
        pass  # already held by something else: the situation under test all the same
    try:
        with started_cluster() as c:
            holder.close()
            status = subprocess.run([str(ROOT / "cluster/status.sh"), "--state", c["state"]], capture_output=True,
                                    text=True, env=_env(), timeout=60)
            assert status.returncode == 0 and "node-1" in status.stdout
            token = Path.home() / ".ray" / "auth_token"  # whoever reads it joins the cluster: this user's only
            assert token.stat().st_mode & 0o077 == 0 and token.parent.stat().st_mode & 0o077 == 0
            yield c
    finally:
        holder.close()


def test_submit_job_and_read_its_results(cluster, tmp_path):
    """scripts/submit.sh of a job whose `--model file.py:function` is given from another directory:
    the file reaches the job and its workers on both nodes, the run folder comes back, and the
    upload leaves out what must not be copied to every node. Something held Ray's default
    job-agent port (52365) while this cluster started (its fixture): start.sh still gave a
    cluster that takes jobs, and status.sh says so."""
    status = subprocess.run([str(ROOT / "cluster/status.sh"), "--state", cluster["state"]], capture_output=True,
                            text=True, env=_env(), timeout=60)
    assert status.returncode == 0 and "job agent: serving" in status.stdout, status.stdout + status.stderr
    results = tmp_path / "results"
    model = ROOT / "tests" / "user_models.py"
    r = subprocess.run([str(ROOT / "scripts/submit.sh"), "--address", cluster["dashboard"], "--results",
                        str(results), "--id", "dptrain-test-model", "--", "--dataset", "mnist1d", "--model",
                        f"{model}:build", "--workers", "2", "--spread", "--steps", "20", "--batch-size", "100",
                        "--optimizer", "adam", "--lr", "0.01"],
                       capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "job dptrain-test-model: SUCCEEDED" in r.stdout
    run = results / "dptrain-test-model"
    assert json.loads((run / "config.json").read_text())["model"] == "tests/user_models.py:build"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["nodes"] == 2 and summary["workers"] == 2
    assert {"config.json", "metrics.jsonl", "params.npz"} <= {p.name for p in run.iterdir()}
    with np.load(run / "params.npz", allow_pickle=False) as params:
        assert params["conv.weight"].shape == (6, 1, 3)
    uploaded = list(Path(cluster["state"], "ray").glob("session_*/runtime_resources/working_dir_files/*/"))
    assert uploaded and all(not (u / ".git").exists() and not (u / ".venv").exists() for u in uploaded)
    assert all((u / "dptrain" / "__init__.py").exists() for u in uploaded)


def test_auto_joins_the_started_cluster_beside_another_ray(cluster, tmp_path):
    """Another Ray instance runs on the machine (a plain `dptrain train`, say): `--address auto`
    joins the cluster cluster/start.sh started, says so, and never the other instance."""
    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
                              "print('up', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True,
                             env=_env(), start_new_session=True)  # its Ray's processes end with it (killpg)
    try:
        assert other.stdout.readline().strip() == "up"
        env = dict(_env(), DPTRAIN_RAY_STATE=cluster["state"])
        for attempt in range(3):
            r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--address", "auto", "--dataset",
                                "moons", "--workers", "2", "--spread", "--epochs", "1", "--out",
                                str(tmp_path / f"run{attempt}")], capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            assert f":{cluster['port']} (--address auto: cluster/start.sh): 2 node(s)" in r.stderr
            assert "across 2 node(s)" in r.stderr
        # without knowing which cluster start.sh started, two instances are ambiguous: refused, naming both
        r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--address", "auto", "--dataset", "moons"],
                           capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 2 and re.search(r"[2-9]\d* Ray instances run on this machine", r.stderr), r.stderr[-2000:]
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()


def test_a_missing_token_is_named_at_once(cluster, tmp_path):
    import time
    env = dict(_env(), DPTRAIN_RAY_STATE=cluster["state"], HOME=str(tmp_path))  # a user without the token
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--address", "auto", "--dataset", "moons"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "needs its authentication token" in r.stderr and "~/.ray/auth_token" in r.stderr
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("address", ["auto", "port", "RAY_ADDRESS"])
def test_train_joins_the_cluster(cluster, tmp_path, address):
    """--address auto, --address HOST:PORT, and no --address with RAY_ADDRESS exported (as
    start.sh's env file does), which the log line names as where the address came from."""
    import socket as s
    target = "auto" if address == "auto" else f"{s.gethostbyname(s.gethostname())}:{cluster['port']}"
    env, flags = _env(), ["--address", target]
    if address == "RAY_ADDRESS":
        env["RAY_ADDRESS"], flags = target, []
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", *flags, "--dataset", "moons",
                        "--workers", "2", "--spread", "--epochs", "1", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = {"auto": "(--address auto: ", "port": "(--address): ", "RAY_ADDRESS": "(RAY_ADDRESS): "}[address]
    assert said in r.stderr, r.stderr[-3000:]
    assert "across 2 node(s)" in r.stderr  # spread over the head and the worker node
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["nodes"] == 2


def test_data_only_the_driver_sees_is_named_before_any_worker_starts(cluster, tmp_path):
    """A token stream read in place from a disk of the driver's own (a tmpfs mounted in a mount
    namespace of the driver's: the cluster's nodes, as other machines, lack it): every node is
    asked to read what the driver checked, and the run stops in one line naming a node that
    cannot, exit 2, before any worker starts."""
    private = tmp_path / "local-disk"
    private.mkdir()
    address = f"{socket.gethostbyname(socket.gethostname())}:{cluster['port']}"
    script = (f"mount -t tmpfs tmpfs {private} && "
              f"{sys.executable} -c 'import numpy as np; (np.arange(5000) % 50).astype(np.uint16).tofile(\"{private}/train.bin\")' && "
              f"exec {sys.executable} -m dptrain.cli train --address {address} --data {private}/train.bin --seq-len 16 "
              "--model gpt --n-layer 1 --n-embd 16 --n-head 2 --steps 5 --no-progress")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True,
                       env=_env(), timeout=180, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert re.search(rf"{private}/train.bin: node [\d.]+ \(\w+\) cannot read this file; every node that runs "
                     r"workers must see it at the same path \(a shared filesystem, or a copy\)", lines[-1]), r.stderr
    assert "Traceback" not in r.stderr and "training" not in r.stderr  # no fleet was started
    assert not (private / "train.bin").exists()  # the driver's disk went with its namespace


def test_a_relative_out_from_another_directory_survives_a_killed_driver(cluster, tmp_path):
    """`--out runs/x` given from another directory than the one the cluster was started in: the
    server and the workers (on both nodes) write where the driver means, the driver is killed
    with SIGKILL, and `--resume runs/x` from the same directory ends on the fault-free parameters."""
    import socket as s
    import time
    import dptrain as dp
    from dptrain import checkpoint
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = f"runs/rel-{os.getpid()}"
    address = f"{s.gethostbyname(s.gethostname())}:{cluster['port']}"
    flags = ["--address", address, "--dataset", "moons", "--model", "2,64,64,2", "--batch-size", "60", "--steps", "400",
             "--dtype", "float64", "--seed", "4", "--workers", "2", "--spread", "--checkpoint-every", "50",
             "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain.cli", "train", *flags, "--out", name], cwd=elsewhere,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = elsewhere / name / "checkpoints"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = checkpoint.list_checkpoints(folder)
            if found and int(found[0].name[5:13]) >= 100:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert checkpoint.list_checkpoints(folder), err[-3000:]
    assert not (elsewhere / name / "params.npz").exists(), "the run ended before it could be killed"
    assert not (ROOT / name).exists()  # not where start.sh ran (the raylets' working directory)
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--resume", name, "--no-progress"], cwd=elsewhere,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored the checkpoint of step" in r.stderr
    clean = dp.train_local(dp.TrainConfig(dataset="moons", model=[2, 64, 64, 2], batch_size=60, steps=400,
                                          dtype="float64", seed=4)).params
    with np.load(elsewhere / name / "params.npz", allow_pickle=False) as params:
        for k in clean:
            np.testing.assert_allclose(params[k], clean[k], rtol=1e-10, atol=1e-13)


MINE_MODEL = '''
import dptrain as dp


class Net(dp.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = dp.nn.Linear(2, 16, dtype="float64")
        self.b = dp.nn.Linear(16, 2, dtype="float64")

    def forward(self, x):
        return self.b(self.a(x).tanh())


def build(input_shape, num_outputs):
    return Net()


def loss_sum(output, target):
    return dp.nn.functional.cross_entropy(output, target, reduction="sum")


CONFIG = dict(dataset="moons", batch_size=64, steps=30, dtype="float64", seed=2, optimizer="adam", lr=0.01)
'''

TRAIN_MINE = '''
import sys
import dptrain as dp
from mine_model import CONFIG, build, loss_sum

result = dp.Trainer(dp.TrainConfig(workers=2, spread=True, out=sys.argv[1], **CONFIG), model=build,
                    loss=loss_sum).fit()
print("final loss", result.summary["train_loss"], "nodes", result.summary["nodes"])
'''


def test_a_users_own_script_through_plain_ray_job_submit(cluster, tmp_path):
    """A script outside this repository (its own Module and loss) submitted with plain `ray job
    submit --working-dir`: its relative out goes to $DPTRAIN_RESULTS on the head node (not Ray's
    temporary copy of the working directory), with every file of a run folder, and its
    parameters are those of the same training in one process."""
    import dptrain as dp
    job = tmp_path / "job"
    job.mkdir()
    (job / "mine_model.py").write_text(MINE_MODEL)
    (job / "train_mine.py").write_text(TRAIN_MINE)
    results = tmp_path / "results"
    env = dict(_env(), RAY_AUTH_MODE="token")
    r = subprocess.run(["ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(job),
                        "--runtime-env-json", json.dumps({"env_vars": {"DPTRAIN_RESULTS": str(results)}}), "--",
                        "python", "train_mine.py", "runs/mine"], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "nodes 2" in r.stdout
    run = results / "runs" / "mine"
    files = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "params.npz", "checkpoints"} <= files
    sys.path.insert(0, str(job))
    try:
        import mine_model
        clean = dp.train_local(dp.TrainConfig(**mine_model.CONFIG), model=mine_model.build,
                               loss=mine_model.loss_sum).params
    finally:
        sys.path.remove(str(job))
        sys.modules.pop("mine_model", None)
    with np.load(run / "params.npz", allow_pickle=False) as params:
        for k in clean:
            np.testing.assert_allclose(params[k], clean[k], rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------- faults from outside

STEPS = 300  # the victim is killed after 100 logged steps: the rest run after the recovery
NODE_RUN = ["--dataset", "moons", "--model", "2,256,256,2", "--batch-size", "60", "--steps", str(STEPS), "--dtype",
            "float64", "--seed", "3", "--log-every", "10", "--workers", "2", "--spread"]


@contextlib.contextmanager
def _training_on(cluster, out, *flags):
    """`dptrain train` of NODE_RUN on `cluster`, started and run until it has logged 100 steps;
    killed when the test ends, however it ends."""
    address = f"{socket.gethostbyname(socket.gethostname())}:{cluster['port']}"
    proc = subprocess.Popen([sys.executable, "-m", "dptrain.cli", "train", "--address", address, *NODE_RUN, *flags,
                             "--no-progress", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for_steps(out, 100, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)


def _wait_for_steps(out, n: int, proc) -> None:
    """Until the run's metrics.jsonl holds `n` distinct steps (or the run ended, or 120 s passed)."""
    import time
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists():
            steps = {json.loads(line).get("step") for line in metrics.read_text().splitlines()
                     if '"kind": "step"' in line and line.endswith("}")}
            if len(steps) >= n:
                return
        time.sleep(0.05)


def _session_pids(cluster, title: str, node: str = "*") -> list:
    """PIDs of the processes titled `title` (ray::Worker, a pgrep pattern) in the cluster's nodes'
    sessions (`node`: only that one's, head or node-1), as an operator finds them (none of another
    Ray instance's)."""
    sessions = [int(p.read_text()) for p in Path(cluster["state"]).glob(f"{node}.sid")]
    return [pid for sid in sessions for pid in subprocess.run(["pgrep", "-s", str(sid), "-f", title],
                                                             capture_output=True, text=True).stdout.split()]


def _pids_of(cluster, title: str, node: str = "*") -> list:
    """_session_pids, of which there must be some."""
    pids = _session_pids(cluster, title, node)
    assert pids, f"no {title} process found"
    return pids


def _assert_fault_free_parameters(out):
    """The run's final parameters are those of NODE_RUN in one process, without faults."""
    import dptrain as dp
    clean = dp.train_local(dp.TrainConfig(dataset="moons", model=[2, 256, 256, 2], batch_size=60, steps=STEPS,
                                          dtype="float64", seed=3)).params
    with np.load(out / "params.npz", allow_pickle=False) as params:
        for k in clean:  # the same global batch whatever the worker count: the same parameters
            np.testing.assert_allclose(params[k], clean[k], rtol=1e-10, atol=1e-13)


@pytest.mark.fault
def test_a_tune_sweep_on_the_cluster_recovers_a_worker_killed_in_a_trial(cluster, tmp_path):
    """`dptrain tune --address` on the started cluster: two trials, one at a time, of 2 workers
    each; a worker process is killed with kill -9 from outside once a trial's run has logged 50
    steps. That trial recovers inside itself, as any run does, and ends with the fault-free
    parameters; the sweep finishes both trials and leaves no dptrain process behind."""
    pytest.importorskip("ray.tune")
    import time
    import dptrain as dp
    steps = 400
    address = f"{socket.gethostbyname(socket.gethostname())}:{cluster['port']}"
    sweep = tmp_path / "sweep"
    flags = [a if a != str(STEPS) else str(steps) for a in NODE_RUN[:-3]]  # NODE_RUN ends --workers 2 --spread
    proc = subprocess.Popen([sys.executable, "-m", "dptrain.cli", "tune", "--address", address, *flags,
                             "--workers", "2", "--seed", "grid:3,4", "--scheduler", "fifo", "--metric", "test_loss",
                             "--mode", "min", "--max-concurrent", "1", "--step-timeout", "5", "--quiet",
                             "--out", str(sweep)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_env(), "TUNE_GLOBAL_CHECKPOINT_S": "0.2"})  # Tune copies a trial's folder here this often
    try:
        deadline, killed = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            # a trial mid-run: 50 steps logged and no summary yet (its workers compute, none is starting)
            live = [p.parent for p in sweep.glob("trial_*/run/metrics.jsonl") if not (p.parent / "summary.json").exists()
                    and p.read_text().count('"kind": "step"') >= 50]
            if live:
                pids = _session_pids(cluster, "ray::Worker")
                if pids:
                    subprocess.run(["kill", "-KILL", pids[0]])
                    killed = pids[0]
            time.sleep(0.05)
        assert killed is not None, "no trial's worker found to kill"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "best: test_loss" in stdout and stdout.count(" done") == 2, stdout
    summaries = {run: json.loads((run / "summary.json").read_text()) for run in
                 (p.parent for p in sweep.glob("trial_*/run/summary.json"))}
    recovered = [run for run, s in summaries.items() if s["failures_survived"] == 1]
    assert len(summaries) == 2 and len(recovered) == 1, summaries
    run = recovered[0]
    assert summaries[run]["workers"] == 2 and summaries[run]["steps"] == steps
    seed = json.loads((run / "config.json").read_text())["seed"]
    clean = dp.train_local(dp.TrainConfig(dataset="moons", model=[2, 256, 256, 2], batch_size=60, steps=steps,
                                          dtype="float64", seed=seed)).params
    with np.load(run / "params.npz", allow_pickle=False) as params:
        for k in clean:
            np.testing.assert_allclose(params[k], clean[k], rtol=1e-10, atol=1e-13)
    deadline = time.monotonic() + 30  # the job's actors end once its driver has
    while time.monotonic() < deadline:
        left = _session_pids(cluster, "ray::(Worker|ParameterServer|ImplicitFunc)")
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"actors of the sweep left on the cluster: {left}"


@pytest.mark.fault
@pytest.mark.parametrize("victims,flags", [
    ([("ray::Worker", "KILL", "*"), ("ray::ParameterServer", "KILL", "*")], []),
    ([("ray::Worker", "STOP", "node-1"), ("ray::ParameterServer", "STOP", "head")], []),
    ([("ray::ServerShard", "KILL", "*")], ["--servers", "2"])])
def test_a_process_killed_or_frozen_from_outside(cluster, tmp_path, victims, flags):
    """kill -9 of a worker's, the server's or (--servers 2, a shard on each node: over the object
    store) a server shard's process, or SIGSTOP of one (a frozen machine; the server's heartbeat
    stops), found by its process title on the cluster's nodes, as an operator would: the run
    recovers and ends with the fault-free run's parameters. Two victims a run: the first once it
    has logged 100 steps, the second (of the run's live processes then) after 100 more. The frozen
    worker is the one on the worker node and the frozen server is on the head, next to the
    driver: the driver ends each frozen process at once, by a task on its node and by itself
    (processes.end). (A frozen shard, and shards on one node, are test_faults.py's.)"""
    out = tmp_path / "run"
    frozen = []
    with _training_on(cluster, out, "--step-timeout", "5", "--checkpoint-every", "100", *flags) as proc:
        try:
            for i, (title, sig, node) in enumerate(victims):
                if i:
                    _wait_for_steps(out, 100 * (i + 1), proc)
                pid = next(p for p in _pids_of(cluster, title, node) if p not in frozen)  # not the one frozen before
                subprocess.run(["kill", f"-{sig}", pid])
                if sig == "STOP":
                    frozen.append(pid)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            for pid in frozen:  # replaced by now
                subprocess.run(["kill", "-KILL", pid])
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and ("lost" in stderr or "hung" in stderr)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["failures_survived"] >= len(victims)
    if flags:  # --servers 2 on the two nodes: a shard on each, the replacement too
        assert summary["servers"] == 2 and summary["server_nodes"] == 2
    _assert_fault_free_parameters(out)


@pytest.mark.fault
@pytest.mark.parametrize("mode,victim", [(["--staleness", "2"], "ray::Worker"),
                                         (["--backup-workers", "1"], "ray::ParameterServer")])
def test_a_relaxed_run_survives_kill_9(cluster, tmp_path, mode, victim):
    """kill -9 of a worker's process in a bounded-staleness run, and of the server's in a
    backup-worker run, spread over two nodes (shared memory on one, the object store to the
    other): the run finishes every step, and is exactly what its records say it applied
    (tests/test_stragglers.py's replay)."""
    import dptrain as dp
    from test_stragglers import _max_rel_diff, _replay
    out = tmp_path / "run"
    with _training_on(cluster, out, *mode, "--straggler", "1:3", "--step-timeout", "5",
                      "--checkpoint-every", "100") as proc:
        subprocess.run(["kill", "-KILL", _pids_of(cluster, victim)[0]])
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "lost" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["failures_survived"] >= 1
    records = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            records[rec["step"]] = rec  # a step run again after the loss: its last record
    assert sorted(records) == list(range(STEPS))
    cfg = dp.TrainConfig(**{k: v for k, v in json.loads((out / "config.json").read_text()).items()
                            if k in dp.TrainConfig.__dataclass_fields__})
    with np.load(out / "params.npz", allow_pickle=False) as params:
        final = {k: params[k] for k in params.files}
    assert _max_rel_diff(final, _replay(cfg, [records[k] for k in range(STEPS)])) < 1e-10
