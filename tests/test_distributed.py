"""The distributed trainer against the single-process loop, on the shared local Ray."""

import os

import numpy as np
import pytest

import dptrain as dp
from dptrain.distributed import ParameterServer, TrainingError, Worker
from dptrain.distributed.messages import Gradient, Request
from dptrain.distributed.trainer import prepare_dataset
from dptrain.blocks import prepare
from dptrain.step import Replica

pytestmark = pytest.mark.ray


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


BASE = dict(dataset="moons", batch_size=50, steps=12, dtype="float64", model=[2, 16, 16, 2], seed=1)


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("opt", [{"optimizer": "sgd", "momentum": 0.9, "lr": 0.1},
                                 {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.001}])
def test_n_workers_equal_single_process(ray_local, workers, opt):
    # batch 50 is not divisible by 3 or 4: shards of 17/17/16 and 13/13/12/12. The evaluations
    # (every 5 steps and at epoch ends, in batches of 16) are data-parallel too: each worker
    # evaluates its run of the batches, and their sums give one process's figures bit for bit.
    cfg = dp.TrainConfig(workers=workers, **BASE, **opt, eval_batch_size=16, eval_every=5)
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    assert len(dist.metrics["steps"]) == 12
    np.testing.assert_allclose([r["loss"] for r in dist.metrics["steps"]],
                               [r["loss"] for r in local.metrics["steps"]], rtol=1e-10)
    assert [r["step"] for r in dist.metrics["evaluations"]] == [r["step"] for r in local.metrics["evaluations"]]
    for key in ("test_loss", "test_accuracy"):  # within 1e-10: the parameters they see differ by that much
        np.testing.assert_allclose([r[key] for r in dist.metrics["evaluations"] + dist.metrics["epochs"]],
                                   [r[key] for r in local.metrics["evaluations"] + local.metrics["epochs"]],
                                   rtol=1e-10)
        np.testing.assert_allclose(dist.summary[key], local.summary[key], rtol=1e-10)
    assert dist.summary["eval_s"] > 0


@pytest.mark.parametrize("placement", [{"workers": 3, "transport": "object_store"}, {"workers": 4}],
                         ids=["object-store", "shared-memory"])
def test_an_evaluation_is_one_processs_bit_for_bit(ray_local, placement):
    """The same parameters evaluated by N workers and by one process: the same bits, whole splits
    and a seeded subset of 3 batches (some workers get none)."""
    cfg = dp.TrainConfig(**dict(BASE, steps=2), **placement, eval_batch_size=8)
    for subset in (None, 3):
        run = cfg.replace(eval_batches=subset)
        dist = dp.Trainer(run).fit()
        replica = Replica(run, prepare_dataset(dp.data.load_dataset("moons"), "float64"),
                                  *prepare(run, dp.data.load_dataset("moons")))
        replica.model.load_state_dict(dist.params)
        for split in ("train", "test"):  # the final figures (the held-out split whole even with a subset)
            assert dist.summary[f"{split}_loss"] == replica.evaluation(split, final=True)["loss"]
            assert dist.summary[f"{split}_accuracy"] == replica.evaluation(split, final=True)["accuracy"]
        assert dist.metrics["epochs"][-1]["test_loss"] == replica.evaluation("test")["loss"]  # during the run


RECIPE = dict(optimizer="adamw", lr=0.01, betas="0.9,0.95", eps=1e-6, weight_decay=0.1, decay_params="matrices",
              schedule="cosine", warmup=3, min_lr=0.001)  # nanoGPT's kind of settings


@pytest.mark.parametrize("placement", [{"workers": 3}, {"workers": 2, "transport": "object_store", "servers": 2}],
                         ids=["shared-memory", "object-store-2-shards"])
def test_adam_betas_eps_and_the_cosine_floor_equal_one_process(ray_local, placement):
    """--betas, --eps, --min-lr and --decay-params matrices reach every optimizer (the server's,
    each shard's: its range of the per-parameter decay) and schedule: N workers equal one process,
    which they change (so the settings are not ignored)."""
    cfg = dp.TrainConfig(**BASE, **RECIPE, **placement)
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    assert dist.metrics["steps"][-1]["lr"] == pytest.approx(0.001 + 0.5 * (0.01 - 0.001) * (1 + np.cos(np.pi * 8 / 9)))
    default = dp.train_local(cfg.replace(betas=None, eps=1e-8, min_lr=0.0))
    assert _max_rel_diff(default.params, local.params) > 1e-6
    decay_all = dp.train_local(cfg.replace(decay_params="all"))
    assert _max_rel_diff(decay_all.params, local.params) > 1e-9


@pytest.mark.parametrize("placement", [{"workers": 3}, {"workers": 2, "servers": 2}],
                         ids=["shared-memory", "one-node-2-shards"])
def test_clipped_gradients_equal_one_process(ray_local, placement):
    """--clip-grad-norm where the gradients meet (the server; with 2 shards on this node, their
    partial sums of squares over the control channel, then the scaled updates): N workers equal
    one process, step norms included, and the clipping changes the run. (Over the object store,
    the shards' clipping is tests/test_seams.py's.)"""
    cfg = dp.TrainConfig(**BASE, optimizer="sgd", momentum=0.9, lr=0.1, clip_grad_norm=0.05, **placement)
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    np.testing.assert_allclose([r["grad_norm"] for r in dist.metrics["steps"]],
                               [r["grad_norm"] for r in local.metrics["steps"]], rtol=1e-10)
    assert min(r["grad_norm"] for r in local.metrics["steps"]) > 0.05  # every step was clipped
    assert dist.summary["shared_memory_workers"] == placement["workers"]
    assert _max_rel_diff(dp.train_local(cfg.replace(clip_grad_norm=None)).params, local.params) > 1e-6


def test_micro_batches_on_workers_equal_one_process(ray_local):
    """--micro-batch 4 on 3 workers (shards of 17/17/16: micro-batches of 4 and a rest) gives
    one process's parameters without micro-batches."""
    cfg = dp.TrainConfig(workers=3, optimizer="sgd", momentum=0.9, lr=0.1, **BASE)
    dist = dp.Trainer(cfg.replace(micro_batch=4)).fit()
    assert _max_rel_diff(dist.params, dp.train_local(cfg).params) < 1e-10


@pytest.mark.parametrize("workers", [2, 3])
def test_object_store_transport_equals_single_process(ray_local, workers):
    cfg = dp.TrainConfig(workers=workers, transport="object_store", optimizer="adam", lr=0.01, **BASE)
    trainer = dp.Trainer(cfg)
    dist = trainer.fit()
    assert trainer.shared == [] and dist.summary["shared_memory_workers"] == 0
    assert dist.summary["update_threads"] == min(1 + workers, len(os.sched_getaffinity(0)))  # auto: same node
    assert _max_rel_diff(dist.params, dp.train_local(cfg).params) < 1e-10
    size = prepare(cfg, dp.data.load_dataset("moons"))[0]().flat().size  # bytes sent: the dense float64 gradient
    assert all(rec["sent_bytes"] == [8 * size] * workers for rec in dist.metrics["steps"])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 3])
def test_compiled_graph_transport_equals_single_process(ray_local, workers):
    """The third transport behind the same boundary (a Ray Compiled Graph) carries the same steps."""
    cfg = dp.TrainConfig(workers=workers, transport="compiled_graph", optimizer="sgd", momentum=0.9, lr=0.1, **BASE)
    dist = dp.Trainer(cfg).fit()
    assert dist.summary["shared_memory_workers"] == 0
    assert _max_rel_diff(dist.params, dp.train_local(cfg).params) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("straggler", ["1:6", "random:6"])
def test_a_straggler_slows_the_step_not_its_result(ray_local, straggler):
    """--straggler makes one worker FACTOR times slower; the synchronous step waits for it, and
    the timeline in every step record shows who waited for whom."""
    cfg = dp.TrainConfig(workers=2, straggler=straggler,
                         **{**BASE, "model": [2, 512, 512, 2], "batch_size": 100, "steps": 16})
    dist = dp.Trainer(cfg).fit()
    assert _max_rel_diff(dist.params, dp.train_local(cfg).params) < 1e-10
    slowest, ratios = [], []
    for rec in dist.metrics["steps"]:
        line = rec["timeline"]
        assert sorted(r for r, _, _ in line["compute"]) == [0, 1]
        durations = {r: end - start for r, start, end in line["compute"]}
        assert line["apply"][0] >= max(end for _, _, end in line["compute"]) - 1e-3  # the update waited for all
        ranked = sorted(durations, key=durations.get)
        ratios.append(durations[ranked[-1]] / durations[ranked[0]])
        slowest.append(ranked[-1])
    # one worker FACTOR times slower (a median: on a busy 2-core machine a step can stretch the fast one)
    assert np.median(ratios) > 2.5
    if straggler.startswith("1:"):
        assert slowest.count(1) >= 14
    else:  # a worker drawn per step: both, over 16 steps
        assert set(slowest) == {0, 1}


def test_shared_memory_is_used_and_released(ray_local):
    import os
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    trainer = dp.Trainer(dp.TrainConfig(workers=2, **BASE))
    trainer.fit()
    assert trainer.shared == [0, 1]
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [n for n in after - before if n.startswith("dptrain-")]


def test_target_accuracy_stops_early(ray_local):
    cfg = dp.TrainConfig(dataset="moons", workers=2, epochs=50, batch_size=100, target_accuracy=0.85, seed=0)
    dist, local = dp.Trainer(cfg).fit(), dp.train_local(cfg)
    s = dist.summary
    assert s["time_to_target_s"] is not None and s["target_epoch"] < 49
    assert s["steps"] == s["target_step"] + 1 == local.summary["target_step"] + 1
    assert dist.metrics["epochs"][-1]["test_accuracy"] >= 0.85


def test_epochs_schedule_and_evaluation(ray_local):
    cfg = dp.TrainConfig(dataset="spirals", workers=2, epochs=2, batch_size=512, schedule="cosine", warmup=2,
                         dtype="float64", seed=2)
    dist, local = dp.Trainer(cfg).fit(), dp.train_local(cfg)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    assert [e["epoch"] for e in dist.metrics["epochs"]] == [0, 1]
    assert dist.metrics["epochs"][-1]["test_accuracy"] == pytest.approx(local.metrics["epochs"][-1]["test_accuracy"])
    lrs = [r["lr"] for r in dist.metrics["steps"]]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warm-up, then cosine decay
    s = dist.summary
    assert s["workers"] == 2 and s["steps"] == len(lrs) and s["samples_per_s"] > 0


def test_worker_error_names_worker_and_step(ray_local):
    cfg = dp.TrainConfig(workers=2, **BASE)
    with pytest.raises(TrainingError, match="worker 1 failed at step 3: RuntimeError: injected fault"):
        dp.Trainer(cfg, faults=[{"rank": 1, "step": 3, "kind": "raise"}]).fit()


def test_mnist1d_four_workers_reach_single_process_accuracy(ray_local):
    cfg = dp.TrainConfig(dataset="mnist1d", workers=4, epochs=30, batch_size=256, lr=0.1, momentum=0.9, seed=0)
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg)
    assert dist.summary["test_accuracy"] >= 0.60
    assert dist.summary["test_accuracy"] == pytest.approx(local.summary["test_accuracy"], abs=0.01)


def test_actors_work_without_ray():
    """The actors are plain classes: one server step by hand equals one local step."""
    cfg = dp.TrainConfig(workers=2, **BASE)
    ds = prepare_dataset(dp.data.load_dataset("moons"), "float64")
    factory, loss = prepare(cfg, ds)
    ps = ParameterServer(cfg.to_dict(), factory, total_steps=12, steps_per_epoch=4)
    workers = [Worker(cfg.to_dict(), factory, loss, ds, rank, 2) for rank in range(2)]
    params = ps.get_weights().copy()
    gradients = [Gradient(parts, reply["meta"], reply["metrics"])
                 for reply, *parts in (w.compute(Request(0), params) for w in workers)]
    record = ps.apply(0, gradients)
    assert record["count"] == 50 and ps.step == 1
    local = dp.train_local(cfg.replace(steps=1))
    np.testing.assert_allclose(np.concatenate([v.ravel() for v in local.params.values()]),
                               np.concatenate([v.ravel() for v in ps.state_dict().values()]), rtol=1e-12)
    with pytest.raises(RuntimeError, match="at step 1 was sent gradients for step 0"):
        ps.apply(0, gradients)


def test_dataset_is_shared_not_copied(ray_local):
    """Workers read the training arrays from Ray's object store: read-only views, not copies."""
    import ray
    from dptrain.distributed.worker import Worker as W
    cfg = dp.TrainConfig(workers=1, **BASE)
    ds = prepare_dataset(dp.data.load_dataset("moons"), "float64")
    ref = ray.put(ds)

    @ray.remote
    class Probe(W):
        def flags(self):
            x = self.replica.x_train
            return {"writeable": x.flags.writeable, "owndata": x.flags.owndata}

    probe = Probe.remote(cfg.to_dict(), *prepare(cfg, ds), ref, 0, 1)
    flags = ray.get(probe.flags.remote())
    ray.kill(probe)
    assert flags == {"writeable": False, "owndata": False}


def test_an_actor_keeps_its_freed_arrays_for_the_next_step(ray_local):
    """In a Ray actor glibc gave every freed array above 128 KiB back to the kernel, so a step's
    activations were faulted in afresh each time; after retain_freed_memory (which workers,
    servers and shards call) a step's worth of allocations no longer page-faults."""
    import ray

    @ray.remote(num_cpus=0)
    class Allocating:
        def faults(self, retain: bool) -> int:
            import resource
            from dptrain import backend
            if retain:
                assert backend.retain_freed_memory()
            for _ in range(3):  # warm: the heap grows to its size once
                a = np.ones((768, 512), np.float32); b = a * 2; del a, b
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(50):  # 1.5 MiB arrays, allocated and freed as a step does
                a = np.ones((768, 512), np.float32); b = a * 2; del a, b
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    actor = Allocating.remote()
    try:
        assert ray.get(actor.faults.remote(True)) < 1000  # 50 x 2 x 384 pages, were they mapped anew
    finally:
        ray.kill(actor)


@pytest.mark.slow
def test_workers_do_not_copy_the_dataset(ray_local):
    """USS (pages a process alone holds) of workers with a 32 MiB dataset vs an almost empty one."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_data_memory.py"
    spec = importlib.util.spec_from_file_location("bench_data_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    empty = bench.measure(bench.synthetic(0.1), 1)[0]["uss"]
    big = bench.synthetic(32)
    mems = bench.measure(big, 3)
    for m in mems:
        assert m["dataset_bytes"] == big.x_train.nbytes
        assert m["uss"] - empty < 0.25 * big.x_train.nbytes, (m, empty)
