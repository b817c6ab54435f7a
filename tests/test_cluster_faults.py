"""Faults from outside on `cluster/start.sh` clusters: a node killed as a crashed machine dies
(a cluster of its own each), a process killed or frozen (one cluster shared by those tests), and
a cluster started while Ray's default job-agent port is taken. In a module of their own, so that
test_real_cluster.py's shared cluster is stopped before these start theirs."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_real_cluster import ROOT, _env, started_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def own_cluster():
    """A head (2 CPUs) and one worker node (1 CPU) for a test that kills the node."""
    with started_cluster(prefix="dpk-") as c:
        yield c


@pytest.fixture(scope="module")
def shared_cluster():
    """One such cluster for the tests that kill or freeze a single process: the nodes outlive
    it, so each test finds the cluster as a user would after the last one recovered. (Started
    after the own_cluster tests above have stopped theirs: pytest keeps the file's order.)
    Something holds Ray's default job-agent port (52365) while it starts, as another Ray
    instance or an orphaned agent may (test_submit_works_when_the_default_agent_port_was_taken)."""
    import socket as s
    holder = s.socket()
    holder.setsockopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1)
    try:
        holder.bind(("0.0.0.0", 52365))
        holder.listen(1)
    except OSError:
        pass  # already held by something else: the situation under test all the same
    try:
        with started_cluster(prefix="dps-") as c:
            holder.close()
            yield c
    finally:
        holder.close()


STEPS = 300  # the victim is killed after 100 logged steps: the rest run after the recovery
NODE_RUN = ["--dataset", "moons", "--model", "2,256,256,2", "--batch-size", "60", "--steps", str(STEPS), "--dtype",
            "float64", "--seed", "3", "--log-every", "10", "--workers", "2", "--spread"]


@contextlib.contextmanager
def _training_on(cluster, out, *flags):
    """`dptrain train` of NODE_RUN on `cluster`, started and run until it has logged 100 steps;
    killed when the test ends, however it ends."""
    import socket
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


def _pids_of(cluster, title: str) -> list:
    """PIDs of the processes titled `title` (ray::Worker, ...) on the cluster's nodes, as an operator finds them."""
    sessions = [int(p.read_text()) for p in Path(cluster["state"]).glob("*.sid")]
    pids = [pid for sid in sessions for pid in subprocess.run(["pgrep", "-s", str(sid), "-f", title],
                                                             capture_output=True, text=True).stdout.split()]
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
@pytest.mark.parametrize("mode,flags", [("restart", []), ("shrink", []), ("restart", ["--servers", "2"])])
def test_a_node_killed_like_a_dead_machine(own_cluster, tmp_path, mode, flags):
    """Every process of a worker node SIGKILLed mid-run (not Cluster.remove_node). With
    --servers 2 the node takes a worker and a server shard: each loss counts against the
    failure budget, also one found while recovering from the other."""
    out = tmp_path / "run"
    with _training_on(own_cluster, out, "--step-timeout", "30", "--on-worker-loss", mode, *flags) as proc:
        sid = int(Path(own_cluster["state"], "node-1.sid").read_text())
        subprocess.run(["pkill", "-KILL", "-s", str(sid)])  # the whole node, as a crashed machine
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "lost" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["failures_survived"] >= (2 if flags else 1)
    assert summary["workers"] == (2 if mode == "restart" else 1)
    if flags:  # both shards live again, on the node that is left
        assert summary["servers"] == 2 and summary["server_nodes"] == 1
    _assert_fault_free_parameters(out)


def test_submit_works_when_the_default_agent_port_was_taken(shared_cluster, tmp_path):
    """Something held Ray's default job-agent port (52365) when the shared cluster started
    (its fixture): start.sh must still give a cluster that takes jobs (or refuse to report it up)."""
    status = subprocess.run([str(ROOT / "cluster/status.sh"), "--state", shared_cluster["state"]], capture_output=True,
                            text=True, env=_env(), timeout=60)
    assert status.returncode == 0 and "job agent: serving" in status.stdout, status.stdout + status.stderr
    r = subprocess.run([str(ROOT / "scripts/submit.sh"), "--address", shared_cluster["dashboard"], "--results",
                        str(tmp_path / "results"), "--id", "dptrain-agent-job", "--", "--dataset", "moons",
                        "--epochs", "1"], capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.fault
@pytest.mark.parametrize("victim,sig,flags", [("ray::Worker,ray::ParameterServer", "KILL", []),
                                              ("ray::Worker", "STOP", []), ("ray::ParameterServer", "STOP", []),
                                              ("ray::ServerShard", "KILL", ["--servers", "2"]),
                                              ("ray::ServerShard", "STOP", ["--servers", "2"])])
def test_a_process_killed_or_frozen_from_outside(shared_cluster, tmp_path, victim, sig, flags):
    """kill -9 of a worker's, the server's or (--servers 2) a server shard's process, or SIGSTOP of
    one (a frozen machine; the server's heartbeat stops), found by its process title on the
    cluster's nodes, as an operator would: the run recovers and ends with the fault-free run's
    parameters. Victims "A,B": A is killed, then B once the run has logged 100 steps more."""
    out = tmp_path / "run"
    victims = victim.split(",")
    with _training_on(shared_cluster, out, "--step-timeout", "5", "--checkpoint-every", "100", *flags) as proc:
        for i, title in enumerate(victims):
            if i:
                _wait_for_steps(out, 100 * (i + 1), proc)
            pids = _pids_of(shared_cluster, title)
            subprocess.run(["kill", f"-{sig}", pids[0]])
        try:
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if sig == "STOP":
                subprocess.run(["kill", "-KILL", pids[0]])  # the frozen process, replaced by now
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
def test_a_relaxed_run_survives_kill_9(shared_cluster, tmp_path, mode, victim):
    """kill -9 of a worker's process in a bounded-staleness run, and of the server's in a
    backup-worker run, spread over two nodes (shared memory on one, the object store to the
    other): the run finishes every step, and is exactly what its records say it applied
    (tests/test_stragglers.py's replay)."""
    import dptrain as dp
    from test_stragglers import _max_rel_diff, _replay
    out = tmp_path / "run"
    with _training_on(shared_cluster, out, *mode, "--straggler", "1:3", "--step-timeout", "5",
                      "--checkpoint-every", "100") as proc:
        subprocess.run(["kill", "-KILL", _pids_of(shared_cluster, victim)[0]])
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
