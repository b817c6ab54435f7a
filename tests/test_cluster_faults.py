"""A node killed as a crashed machine dies, on `cluster/start.sh` clusters of their own (one per
test: the node does not come back). In a module of its own, run before test_real_cluster.py,
whose cluster carries the tests that kill or freeze a single process, so that only one cluster
runs at a time."""

import json
import subprocess
from pathlib import Path

import pytest

from test_real_cluster import NODE_HEALTH_CHECK, STEPS, _assert_fault_free_parameters, _training_on, started_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def own_cluster():
    """A head (2 CPUs) and one worker node (1 CPU) for a test that kills the node, whose death
    Ray reports after about 4 s instead of 15 (NODE_HEALTH_CHECK)."""
    with started_cluster(prefix="dpk-", env=NODE_HEALTH_CHECK) as c:
        yield c


@pytest.mark.fault
@pytest.mark.parametrize("mode,flags", [("shrink", []), ("restart", ["--servers", "2"])])
def test_a_node_killed_like_a_dead_machine(own_cluster, tmp_path, mode, flags):
    """Every process of a worker node SIGKILLed mid-run (not Cluster.remove_node). With
    --servers 2 the node takes a worker and a server shard: each loss counts against the
    failure budget, also one found while recovering from the other, and both are restarted
    (the run with one server restarting its worker was a third case, and a cluster of its own:
    cut for the suite's time, as this one covers it)."""
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
