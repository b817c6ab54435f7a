"""The distributed layer's seams, each without Ray: the update, the step loop, the codec, the worker's
one entry point, the recovery policy, replay in the run log, and the engine's gradient hook."""

import numpy as np
import pytest

import dptrain as dp
from dptrain import compress
from dptrain.blocks import build_optimizer, prepare
from dptrain.distributed import recovery, shards as shards_module
from dptrain.distributed.errors import ServerLost, ShardLost, TrainingError, WorkerLost
from dptrain.distributed.loops import Synchronous
from dptrain.distributed.messages import Gradient, Request, ServerView
from dptrain.distributed.relaxed import Relaxed
from dptrain.distributed.shards import ServerShard, ShardedUpdate
from dptrain.distributed.trainer import prepare_dataset
from dptrain.distributed.update import LocalUpdate
from dptrain.distributed.worker import Worker
from dptrain.callbacks import Callbacks, Sink
from dptrain.metrics import MetricsLog
from dptrain.nn import MLP
from dptrain.rundir import RunDir

BASE = dict(dataset="moons", batch_size=50, steps=12, dtype="float64", model=[2, 16, 16, 2], seed=1)


class Watching:
    """A transport as the update sees it: it hears the update begin and end."""

    def __init__(self):
        self.heard = []

    def updating(self, begins, version):
        self.heard.append(("begins" if begins else "ends", version))


def test_auto_update_threads_are_the_cores_waiting_for_the_update(monkeypatch):
    """--update-threads 0: the server's thread and one per worker on its node, within the cores
    this process may run on; one in a relaxed run (its workers compute during updates)."""
    import os
    from dptrain.distributed.server import update_threads
    placement = [{"node_id": "here"}, {"node_id": "here"}, {"node_id": "there"}]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert update_threads(placement, "here", Synchronous) == 3
    assert update_threads(placement, "elsewhere", Synchronous) == 1
    assert update_threads(placement, "here", Relaxed) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert update_threads(placement, "here", Synchronous) == 2


def _update_pair(cfg):
    model = MLP(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
    return model, build_optimizer(cfg, model.parameters())


def test_the_local_update_applies_the_mean_gradient_and_tells_transports(tmp_path):
    cfg = dp.TrainConfig(**BASE, momentum=0.9, lr=0.1)
    model, opt = _update_pair(cfg)
    reference = _update_pair(cfg)[1]
    update = LocalUpdate(model, opt, compress.codec("none", opt.flat.size, opt.flat.data.dtype))
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(opt.flat.size) for _ in range(3)]
    watching = Watching()
    update.apply(4, [Gradient([g], [None], {}) for g in grads], 50, 0.1, [watching])
    reference.lr = 0.1
    reference.update(reference.flat.data, reference.flat.grad,
                     lambda a, b: np.divide(grads[0][a:b] + grads[1][a:b] + grads[2][a:b], 50,
                                            out=reference.flat.grad[a:b]))
    np.testing.assert_allclose(update.parameters(), reference.flat.data, rtol=1e-15)
    assert watching.heard == [("begins", 4), ("ends", 5)]  # the seqlock's two marks
    with pytest.raises(RuntimeError, match="no initial state"):  # a used update cannot go back to the start
        update.restore(None)
    storage = np.zeros(opt.flat.size)
    update.place(storage, "dptrain-t-params")  # the parameters move, unchanged (the alignment gaps between them are not theirs)
    assert update.parameters() is storage
    for moved, want in zip(update.flat.views(storage), reference.flat.views(reference.flat.data)):
        np.testing.assert_array_equal(moved, want)


class _Remote:
    """An actor's method called in this process: .options(...).remote(...) runs it now."""

    def __init__(self, fn):
        self.fn = fn

    def options(self, **_):
        return self

    def remote(self, *args):
        return self.fn(*args)


class _LocalShard:
    def __init__(self, shard):
        for name in ("load", "update", "state", "mean", "scaled"):
            setattr(self, name, _Remote(getattr(shard, name)))
        self.ready = _Remote(lambda: {"pid": None, "started": None, "node_id": "node-a"})  # processes.identity


@pytest.mark.parametrize("setting,clip", [("none", None), ("fp16", None), ("none", 0.5)])
def test_the_sharded_update_equals_the_local_one_and_fetches_only_when_older(monkeypatch, setting, clip):
    """ShardedUpdate against K shards called in-process: the same numbers as LocalUpdate (with
    --clip-grad-norm too: the shards' sums of squares make the global norm), its parameters and
    state fetched from the shards only when its copy is older."""
    calls = []

    def get_all(refs, lost, timeout, actors):  # "references" are the values themselves here
        calls.append(len(refs))
        return dict(refs)
    monkeypatch.setattr(shards_module, "get_all", get_all)
    cfg = dp.TrainConfig(**BASE, optimizer="adam", lr=0.01, servers=3, transport="object_store", compress=setting,
                         clip_grad_norm=clip)
    (m1, o1), (_, o2) = _update_pair(cfg), _update_pair(cfg)
    local = LocalUpdate(m1, o1, compress.codec(setting, o1.flat.size, o1.flat.data.dtype), clip)
    codec = compress.codec(setting, o2.flat.size, o2.flat.data.dtype)
    sharded = ShardedUpdate(None, o2, codec, 3, 60.0, clip)
    sharded.attach([_LocalShard(ServerShard(cfg.to_dict(), j)) for j in range(3)])
    # the shards' node is not the workers': every worker reaches them through the object store
    assert sharded.transport_setting("auto", [{"node_id": "node-b", "device": "cpu"}], "node-a") == "object_store"
    worker_codecs = [compress.codec(setting, o1.flat.size, o1.flat.data.dtype) for _ in range(2)]
    rng = np.random.default_rng(1)
    for step in range(3):
        grads = [rng.standard_normal(o1.flat.size) for _ in range(2)]
        whole = [c.encode(g) for c, g in zip(worker_codecs, grads)]
        norm = local.apply(step, [Gradient([p.copy()], [m], {}) for p, m in whole], 50, 0.01, [])
        parts = [[c.encode(g[lo:hi]) for c, (lo, hi) in zip(compress.codec(setting, o1.flat.size, "float64")
                                                           .ranges(list(sharded.ranges)), sharded.ranges)]
                 for g in grads]
        norm_k = sharded.apply(step, [Gradient([p.copy() for p, _ in ps], [m for _, m in ps], {}) for ps in parts], 50,
                               0.01, [])
        assert norm_k == pytest.approx(norm, rel=1e-12)  # the global norm from the shards' partial sums
        if clip is not None:
            assert norm > clip  # so the clipping acted
    before = len(calls)
    params = sharded.parameters()
    assert len(calls) == before + 1 and sharded.parameters() is params and len(calls) == before + 1  # once
    np.testing.assert_allclose(params, local.parameters(), rtol=1e-12, atol=1e-15)
    state, want = sharded.state()[1], local.state()[1]
    assert state["steps"] == want["steps"] == 3 and sorted(state["state"]) == sorted(want["state"])
    for name in want["state"]:  # Adam's moments, gathered from the three ranges
        np.testing.assert_allclose(state["state"][name], want["state"][name], rtol=1e-12, atol=1e-15)
    sharded.restore(None)  # a lost shard without a checkpoint: the initial state, sent before the next step
    assert sharded.parameters() is params and np.array_equal(params, sharded.initial[0])
    with pytest.raises(RuntimeError, match="before the shards were attached"):
        ShardedUpdate(None, o1, codec, 3, 60.0, clip).apply(0, [], 1, 0.1, [])


def test_the_sharded_update_shares_the_node_only_when_everything_is_on_it(monkeypatch):
    """Shards update their ranges in place (shared memory) only where every shard and every worker
    is a CPU process on the server's node, the gradients dense and the transport auto; anything
    else sends every worker through the object store."""
    monkeypatch.setattr(shards_module, "get_all", lambda refs, lost, timeout, actors: dict(refs))
    cfg = dp.TrainConfig(**BASE, optimizer="sgd", lr=0.1, servers=2)
    here, cpu = "node-a", {"node_id": "node-a", "device": "cpu"}
    for setting, placement, codec, want in [
            ("auto", [cpu, cpu], "none", "auto"),
            ("auto", [cpu, {"node_id": "node-b", "device": "cpu"}], "none", "object_store"),
            ("auto", [cpu, {"node_id": "node-a", "device": "cuda"}], "none", "object_store"),
            ("object_store", [cpu, cpu], "none", "object_store"),
            ("auto", [cpu, cpu], "fp16", "object_store")]:
        _, opt = _update_pair(cfg)
        sharded = ShardedUpdate(None, opt, compress.codec(codec, opt.flat.size, opt.flat.data.dtype), 2, 60.0)
        sharded.attach([_LocalShard(ServerShard(cfg.to_dict(), j)) for j in range(2)])
        assert sharded.transport_setting(setting, placement, here) == want, (setting, placement, codec)
        assert sharded.local == (want == "auto")


def _view(**calls):
    defaults = dict(run_key="t", step_timeout=5.0, total_steps=100, size=4, dtype=np.dtype("float64"),
                    checkpoints=None, version=lambda: 0, parameters=lambda: None, outgoing=lambda: (None, []),
                    place=lambda a, name: None, carriers=lambda: [], progressed=lambda: None, begin=lambda s: None,
                    gather=lambda s: [], conclude=lambda *a: None)
    return ServerView(**dict(defaults, **calls))


def test_parameters_as_small_as_ray_sends_inside_a_call_are_not_put(monkeypatch):
    """Over the object store, parameters small enough for Ray to send inside each call go as
    themselves (a put cost the tiny model more than its step); larger ones are put once for
    every worker's call."""
    import ray
    from dptrain.distributed import transport
    put = []
    monkeypatch.setattr(ray, "put", lambda a: put.append(a) or "ref")
    small = np.zeros(transport.INLINE_BYTES // 4, np.float32)
    large = np.zeros(transport.INLINE_BYTES // 4 + 1, np.float32)
    assert transport.shared_argument(small) is small and not put
    assert transport.shared_argument(large) == "ref" and len(put) == 1 and put[0] is large


def test_the_synchronous_loop_begins_gathers_and_concludes_each_step():
    seen = []
    view = _view(begin=lambda s: seen.append(("begin", s)), gather=lambda s: seen.append(("gather", s)) or [s],
                 conclude=lambda step, gradients, t0, out: out.append((step, gradients)))
    out = []
    Synchronous(view).run(3, 2, out)
    assert seen == [("begin", 3), ("gather", 3), ("begin", 4), ("gather", 4)]
    assert out == [(3, [3]), (4, [4])]


class _Carrier:
    """A transport running a relaxed task at once: its gradient is [shard, version]."""
    reuses_buffers = False

    def __init__(self, version):
        self.version, self.done = version, []

    def assign(self, rank, task):
        self.done.append((rank, Gradient([np.array([task["shard"], self.version()])], [None],
                                         {"rank": rank, "version": self.version()})))

    def poll(self, timeout):
        done, self.done = self.done, []
        return done


def test_the_relaxed_loop_keeps_its_staleness_bound_through_the_view():
    state = {"step": 0}
    carrier = _Carrier(lambda: state["step"])

    def conclude(step, gradients, t0, out, extra=None):
        out.append((step, extra["versions"]))
        state["step"] += 1
    loop = Relaxed(_view(version=lambda: state["step"], total_steps=6, carriers=lambda: [carrier, carrier],
                         conclude=conclude), tau=2, backups=0)
    out = []
    loop.run(0, 6, out)
    assert [step for step, _ in out] == list(range(6))
    for step, versions in out:  # [rank, shard, version]: both shards, never more than tau versions old
        assert sorted(shard for _, shard, _ in versions) == [0, 1]
        assert all(step - 2 <= v <= step for _, _, v in versions)
    assert loop.checkpoint()["not_applied"] == []


def test_the_dense_codec_is_the_identity_and_encoded_ones_decode_their_sum():
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(64).astype(np.float32) for _ in range(3)]
    dense = compress.codec("none", 64, np.float32)
    payload, meta = dense.encode(grads[0])
    assert payload is grads[0] and meta is None and dense.writes_in_place
    assert dense.addends(grads, [None] * 3) == grads  # mean_gradient adds them itself
    half = compress.codec("fp16", 64, np.float32)
    encoded = [compress.codec("fp16", 64, np.float32).encode(g) for g in grads]
    (total,) = half.addends([p for p, _ in encoded], [m for _, m in encoded])
    np.testing.assert_allclose(total, sum(grads), atol=3e-3)
    assert not half.writes_in_place and [c.size for c in half.ranges([(0, 16), (16, 64)])] == [16, 48]


def test_the_workers_one_entry_point_sends_whole_or_by_ranges():
    cfg = dp.TrainConfig(**BASE, workers=2)
    ds = prepare_dataset(dp.data.load_dataset("moons"), "float64")
    factory, loss = prepare(cfg, ds)
    worker = Worker(cfg.to_dict(), factory, loss, ds, 1, 2)
    params = worker.replica.flat.data.copy() * 0.5
    reply, grad = worker.compute(Request(3), params)
    grad = grad.copy()
    ranges = ((0, 64), (64, params.size))
    reply_k, *parts = worker.compute(Request(3, ranges=ranges), *(params[lo:hi] for lo, hi in ranges))
    np.testing.assert_array_equal(np.concatenate(parts), grad)
    assert reply["metrics"]["loss_sum"] == reply_k["metrics"]["loss_sum"] and reply["meta"] == [None]
    assert reply["metrics"]["sent_bytes"] == grad.nbytes
    task, _ = worker.compute(Request.task({"step": 3, "shard": 0, "of": 4}, version=7))
    assert task["metrics"]["version"] == 7 and task["metrics"]["shard"] == 0
    assert task["metrics"]["count"] < reply["metrics"]["count"]  # a quarter of the batch, not a half


def test_the_recovery_policy_is_a_value():
    cfg = dp.TrainConfig(**BASE, workers=3, max_failures=2)
    assert recovery.decide(WorkerLost(1, 5, "x"), cfg, 3, 1) == recovery.Recovery(recovery.REPLACE_WORKER, 1)
    shrink = cfg.replace(on_worker_loss="shrink")
    assert recovery.decide(WorkerLost(1, 5, "x"), shrink, 3, 1) == recovery.Recovery(recovery.SHRINK, 1)
    assert recovery.decide(WorkerLost(0, 5, "x"), shrink, 1, 1).action == recovery.REPLACE_WORKER  # the last one
    assert recovery.decide(ShardLost(2, 5, "x"), cfg, 3, 1) == recovery.Recovery(recovery.REPLACE_SHARD, 2)
    assert recovery.decide(ServerLost(5, "x"), cfg, 3, 2) == recovery.Recovery(recovery.REPLACE_SERVER)
    graph = cfg.replace(transport="compiled_graph")
    assert recovery.decide(ServerLost(5, "x"), graph, 3, 1).new_workers  # Ray keeps the old ones in its graph
    with pytest.raises(TrainingError, match="--max-failures 2"):
        recovery.decide(WorkerLost(1, 5, "x"), cfg, 3, 3)


def test_the_run_log_rewinds_itself_and_every_sink_that_can(tmp_path):
    cfg = dp.TrainConfig(**BASE, log_every=100)
    run = RunDir(str(tmp_path / "run"))
    run.open(cfg)
    plain = []
    mlog = MetricsLog(cfg, 12, workers=1, callbacks=Callbacks(run, Sink(plain.append)))
    for step in range(6):
        mlog.step({"step": step, "loss": 1.0, "count": 10, "time_s": 0.1})
        if step == 3:
            mlog.end_epoch(0, 3, {"loss": 1.0})
    mlog.rewind(2, {"kind": "recovery", "resume_step": 2})
    assert [r["step"] for r in mlog.steps] == [0, 1] and mlog.epochs == [] and mlog.next_step == 2
    assert mlog.epoch_open  # steps 0 and 1 wait for their epoch's end again: it is replayed
    for step in (2, 3):
        mlog.step({"step": step, "loss": 3.0, "count": 10, "time_s": 0.1})
    assert mlog.end_epoch(0, 3, {"loss": 1.0})["train_loss"] == 2.0  # over the epoch's four steps
    run.close()
    kinds = [(r.get("kind"), r.get("step")) for _, r in run._records()]
    assert kinds[:3] == [("step", 0), ("step", 1), ("recovery", None)]  # the file forgot steps 2..5 and the epoch
    assert kinds[3:] == [("step", 2), ("step", 3), ("epoch", 3)]
    assert plain[7]["kind"] == "recovery" and len(plain) == 11  # a plain sink sees what happened


def test_only_a_parameter_lets_backward_write_its_gradient_in_place():
    from dptrain.tensor import Tensor, claim_grad
    plain = Tensor(np.ones(3), requires_grad=True)
    plain.grad = np.zeros(3)
    assert claim_grad(plain) is None  # the engine never assumes where a gradient lives
    model = MLP([2, 3], seed=0)
    flat = model.flat()
    flat.zero_grad()
    weight = model.parameters()[0]
    assert claim_grad(weight) is weight.grad  # known to be zero: write it in place, once
    assert claim_grad(weight) is None
