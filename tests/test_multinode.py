"""Several Ray nodes on this machine (ray.cluster_utils.Cluster): workers spread over nodes."""

import numpy as np
import pytest

import dptrain as dp

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def three_nodes():
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()  # this module needs its own multi-node Ray; later tests restart the shared one
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for k in (1, 2):
        cluster.add_node(num_cpus=1, resources={f"node_{k}": 1})
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_spread_workers_give_the_same_parameters(three_nodes):
    cfg = dp.TrainConfig(dataset="moons", workers=3, batch_size=64, steps=10, dtype="float64", spread=True,
                         cpus_per_worker=1, model=[2, 8, 2], seed=4)
    trainer = dp.Trainer(cfg)
    dist = trainer.fit()
    local = dp.train_local(cfg)
    assert len({p["node_id"] for p in trainer.placement}) == 3  # one worker per node
    assert dist.summary["nodes"] == 3
    for k in local.params:
        np.testing.assert_allclose(dist.params[k], local.params[k], rtol=1e-10, atol=1e-14)


def test_sharded_servers_spread_over_the_nodes_give_the_same_parameters(three_nodes):
    """--servers 3 on three nodes: one shard per node (SPREAD), the workers' slices crossing
    between nodes through the object store, and still the single process's parameters."""
    cfg = dp.TrainConfig(dataset="moons", workers=3, servers=3, batch_size=64, steps=10, dtype="float64",
                         spread=True, cpus_per_worker=1, model=[2, 64, 2], optimizer="adam", lr=0.01, seed=4)
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg)
    assert dist.summary["servers"] == 3 and dist.summary["server_nodes"] == 3 and dist.summary["nodes"] == 3
    for k in local.params:
        np.testing.assert_allclose(dist.params[k], local.params[k], rtol=1e-10, atol=1e-14)


def test_unplaceable_job_fails_fast(three_nodes):
    cfg = dp.TrainConfig(dataset="moons", workers=4, steps=2, cpus_per_worker=1)
    with pytest.raises(dp.distributed.ClusterError, match=r"4 workers x 1 CPU = 4 CPUs, but the Ray cluster has 3"):
        dp.Trainer(cfg).fit()
