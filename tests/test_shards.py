"""Sharded parameter servers (--servers K): ranges, their arithmetic, exactness, checkpoints."""

import logging
import shutil
import time

import numpy as np
import pytest

import dptrain as dp
from dptrain import checkpoint
from dptrain.distributed.shards import ServerShard, bounds, sliced_state
from dptrain.blocks import build_optimizer
from dptrain.nn.module import Parameter
from dptrain.step import mean_gradient

BASE = dict(dataset="moons", batch_size=50, steps=12, dtype="float64", model=[2, 16, 16, 2], seed=1)
SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "lr": 0.1}
ADAM = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.001}


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


@pytest.mark.parametrize("size,k,itemsize", [(1_863_690 + 6, 2, 4), (1_863_696, 4, 8), (4096, 3, 4), (40, 4, 8),
                                             (6000, 7, 8)])
def test_ranges_cover_the_buffer_in_order_aligned_and_balanced(size, k, itemsize):
    ranges = bounds(size, k, itemsize)
    step = 64 // itemsize
    assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
    assert all(lo % step == 0 for lo, _ in ranges)  # each starts on a 64-byte boundary
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= step  # balanced by bytes, to one alignment unit


@pytest.mark.parametrize("opt", [SGD, ADAM, {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1}])
def test_shards_apply_exactly_the_one_servers_update(opt):
    """K shards, each stepping its range of the parameters and optimizer state with its slices of
    the workers' gradients, give the whole-buffer update bit for bit (it is elementwise)."""
    rng = np.random.default_rng(0)
    cfg = dp.TrainConfig(**dict(BASE, **opt))
    size = 5000
    whole = build_optimizer(cfg, [Parameter(rng.standard_normal(size))])
    ranges = bounds(size, 3, 8)
    shards = [ServerShard(cfg.to_dict(), j) for j in range(3)]
    state = whole.state_dict()
    for shard, (lo, hi) in zip(shards, ranges):
        shard.load(0, lo, whole.flat.data[lo:hi].copy(), sliced_state(state, lo, hi))
    for step in range(5):
        grads = [rng.standard_normal(size) for _ in range(3)]  # three workers' gradients of loss sums
        count, lr = 50, 0.1 / (step + 1)
        whole.lr = lr
        whole.update(whole.flat.data, whole.flat.grad,
                     lambda a, b: mean_gradient(grads, count, whole.flat.grad, a, b))
        done = [shard.update(step, count, lr, None, *(g[lo:hi] for g in grads))
                for shard, (lo, hi) in zip(shards, ranges)]
        assert [status[0] for status, _ in done] == [step + 1] * 3  # each shard's new step, then its new range
        assert np.array_equal(np.concatenate([new for _, new in done]), whole.flat.data)
    for shard, (lo, hi) in zip(shards, ranges):
        st = shard.state()
        assert st["step"] == 5 and st["optimizer"]["steps"] == whole.steps
        for name, a in whole.state_dict()["state"].items():
            assert np.array_equal(st["optimizer"]["state"][name], a[lo:hi]), name
    with pytest.raises(RuntimeError, match="at step 5 was sent gradients for step 3"):
        shards[0].update(3, 50, 0.1, None, np.zeros(ranges[0][1]))


@pytest.mark.ray
@pytest.mark.parametrize("workers,servers,opt", [(1, 2, SGD), (3, 4, ADAM)], ids=["sgd-1-2", "adam-3-4"])
def test_k_servers_equal_one_process(ray_local, workers, servers, opt, caplog):
    """N workers over K shards equal one process: each placement with one of the two optimizers
    (a shard's state is its range of the optimizer's, whatever the rule: test_optim). On this one
    node the workers are on shared memory and the shards update their ranges of its segments in
    place: nothing to warn about."""
    cfg = dp.TrainConfig(workers=workers, servers=servers, **BASE, **opt)
    with caplog.at_level(logging.WARNING, logger="dptrain"):
        dist = dp.Trainer(cfg).fit()
    assert not [r.getMessage() for r in caplog.records if "--servers" in r.getMessage()]
    local = dp.train_local(cfg)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    assert dist.summary["servers"] == servers and dist.summary["shared_memory_workers"] == workers
    np.testing.assert_allclose([r["loss"] for r in dist.metrics["steps"]],
                               [r["loss"] for r in local.metrics["steps"]], rtol=1e-10)


@pytest.mark.ray
def test_k_servers_are_the_one_server_bit_for_bit_and_checkpoint_one_step(ray_local, tmp_path):
    """Sharded and one-server runs over the object store (N = 3): the same bits at every
    checkpoint, parameters and optimizer state alike (every shard's range of one step), and a
    resume of the sharded run's step-4 checkpoint with another K ends on the same bits."""
    runs = {}
    for k in (1, 3):
        cfg = dp.TrainConfig(workers=3, servers=k, transport="object_store", out=str(tmp_path / f"k{k}"),
                             checkpoint_every=4, keep_checkpoints=5, **BASE, **ADAM)
        runs[k] = dp.Trainer(cfg).fit()
    for name in runs[1].params:
        assert np.array_equal(runs[1].params[name], runs[3].params[name]), name
    for step in (4, 8, 12):
        one, three = (checkpoint.read(tmp_path / f"k{k}" / "checkpoints" / f"ckpt-{step:08d}.json") for k in (1, 3))
        assert one["step"] == three["step"] == step
        assert np.array_equal(one["params"], three["params"])
        assert one["optimizer"]["steps"] == three["optimizer"]["steps"] == step
        for name, a in one["optimizer"]["state"].items():
            assert np.array_equal(a, three["optimizer"]["state"][name]), name
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "k3", again)
    cfg = dp.TrainConfig(workers=3, servers=2, out=str(again), checkpoint_every=4, **BASE, **ADAM)
    resumed = dp.Trainer(cfg, resume=True, resume_at_most=4).fit()
    assert resumed.summary["resumed_from_step"] == 4
    for name in runs[1].params:
        assert np.array_equal(runs[1].params[name], resumed.params[name]), name


@pytest.mark.ray
def test_a_shard_hung_over_the_object_store_is_replaced_and_the_run_is_exact(ray_local, tmp_path):
    """A server shard hangs in its update of a step over the object store (injected; a frozen
    shard on one node, and kill -9 of one on a cluster, are tests/test_faults.py's and
    tests/test_real_cluster.py's): killed once it misses --step-timeout, a new shard, every range
    back to the newest checkpoint, the lost steps run again, the fault-free run's parameters."""
    cfg = dp.TrainConfig(workers=2, servers=2, transport="object_store", out=str(tmp_path), checkpoint_every=4,
                         step_timeout=2, **BASE, **SGD)
    result = dp.Trainer(cfg, faults=[{"role": "shard", "index": 1, "step": 6, "kind": "hang"}]).fit()
    assert result.summary["failures_survived"] == 1 and result.summary["steps"] == 12
    assert _max_rel_diff(result.params, dp.train_local(cfg).params) < 1e-10


@pytest.mark.ray
def test_compressed_gradients_reach_the_shards(ray_local):
    """--compress with --servers: fp16 (as bf16: test_compress.py) is elementwise, so each range
    encoded on its own gives the one server's run bit for bit; top-k picks the largest entries
    of each range and keeps each range's residual: ceil(RATIO x range) entries a range, and it
    still learns."""
    from dptrain.nn import MLP
    cfg = dp.TrainConfig(workers=2, transport="object_store", compress="fp16", **dict(BASE, steps=8), **SGD)
    one, two = (dp.Trainer(cfg.replace(servers=k)).fit() for k in (1, 2))
    for name in one.params:
        assert np.array_equal(one.params[name], two.params[name]), name
    assert [r["sent_bytes"] for r in two.metrics["steps"]] == [r["sent_bytes"] for r in one.metrics["steps"]]
    topk = cfg.replace(compress="topk:0.1", servers=3, steps=40, batch_size=100)
    result = dp.Trainer(topk).fit()
    size = MLP(BASE["model"], dtype="float64", seed=1).flat().size
    k = sum(-(-(hi - lo) // 10) for lo, hi in bounds(size, 3, 8))  # ceil(0.1 x range) per range
    assert all(r["sent_bytes"] == [k * (8 + 4)] * 2 for r in result.metrics["steps"])
    losses = [r["loss"] for r in result.metrics["steps"]]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


@pytest.mark.ray
def test_a_lost_slice_is_its_shards_loss_not_the_workers(ray_local):
    """A worker that cannot fetch a shard's slice (it died with the shard's node: Ray does not
    rebuild an actor's result) is not the loss to repair: the server's check after a worker loss
    names the shard, so that it is replaced and restored (replacing the worker alone sent the
    same lost slice again until the failure budget was spent)."""
    import ray
    from dptrain.distributed.errors import ShardLost
    from dptrain.compress import Dense
    from dptrain.distributed.shards import ShardedUpdate
    cfg = dp.TrainConfig(**dict(BASE, **SGD))
    sharded = ShardedUpdate(None, build_optimizer(cfg, [Parameter(np.arange(4096.0))]), Dense(4096, "float64"), 2,
                            step_timeout=20)
    actors = [ray.remote(ServerShard).options(num_cpus=0).remote(cfg.to_dict(), j) for j in range(2)]
    try:
        sharded.attach(actors)
        sharded.outgoing()  # the shards get their ranges (over the object store: no worker shares their node)
        sharded.check_outgoing(0)  # both alive, both slices there: nothing to say
        @ray.remote(num_cpus=0)
        class Owner:
            def put(self, a):
                return [ray.put(a)]  # in a list: the reference stays this actor's
        owner = Owner.remote()
        sharded.refs[1] = ray.get(owner.put.remote(np.zeros(1 << 16)))[0]
        ray.kill(owner)  # an object whose owner died: lost, as one on a dead node is
        for _ in range(100):  # until this process has heard of the owner's death
            try:
                ray.get(sharded.refs[1], timeout=5)
                time.sleep(0.1)
            except ray.exceptions.ObjectLostError:
                break
        with pytest.raises(ShardLost, match="shard 1 lost at step 0: its newest parameters were lost"):
            sharded.check_outgoing(0)
        ray.kill(actors[0])
        for _ in range(100):  # ray.kill is asynchronous: a call sent at once may still be answered
            try:
                ray.get(actors[0].ready.remote(), timeout=5)
                time.sleep(0.1)
            except ray.exceptions.RayActorError:
                break
        with pytest.raises(ShardLost, match="shard 0 lost at step 0: its process died"):
            sharded.check_outgoing(0)
    finally:
        for a in actors:
            ray.kill(a)
