"""Relaxed steps (dptrain/distributed/relaxed.py): bounded staleness and backup workers.

A relaxed run is not one process's run, but it must be exactly what it records: each
step's update is the mean gradient of the shards its record lists, each computed on the
parameter version it lists. `_replay` recomputes that in one process; every run here is
checked against it to 1e-10 in float64, on top of the mode's own promises (the
staleness bound, N gradients per step, the late ones dropped, every example used).
"""

import json
import shutil

import numpy as np
import pytest

import dptrain as dp
from dptrain.data import BatchSampler
from dptrain.blocks import build_optimizer, build_schedule, load_data, prepare, total_steps
from dptrain.step import Replica, mean_gradient

pytestmark = pytest.mark.ray

BASE = dict(dataset="moons", batch_size=60, steps=24, dtype="float64", model=[2, 64, 64, 2], seed=3,
            optimizer="sgd", momentum=0.9, lr=0.05, cpus_per_worker=0.5)


def _replay(cfg: dp.TrainConfig, records: list) -> dict:
    """The final parameters of applying, in one process, what a relaxed run's step records say:
    step k's update from the shards listed ([rank, shard, version] with staleness, shard = rank
    of workers + backups with backup workers), each on the parameter version listed."""
    dataset = load_data(cfg)
    factory, loss = prepare(cfg, dataset)
    replica = Replica(cfg, dataset, factory, loss)
    opt = build_optimizer(cfg, replica.model.parameters())
    schedule = build_schedule(cfg, total_steps(cfg, len(dataset)))
    sampler = BatchSampler(len(dataset), cfg.batch_size, cfg.seed)
    versions = {0: replica.flat.data.copy()}
    for rec in records:
        k = rec["step"]
        if "versions" in rec:
            parts = [(shard, cfg.workers, version) for _, shard, version in rec["versions"]]
        else:
            parts = [(rank, cfg.replicas, k) for rank in rec["counted"]]
        grads, count = [], 0
        for shard, of, version in parts:
            replica.flat.data[...] = versions[version]
            indices, first = sampler.shard_at(k, of, shard)
            count += replica.compute_gradients(indices, k, first)[2]
            grads.append(replica.flat.grad.copy())
        replica.flat.data[...] = versions[k]
        mean_gradient(grads, count, out=replica.flat.grad)
        opt.lr = schedule(k)
        opt.step()
        versions[k + 1] = replica.flat.data.copy()
    return replica.model.state_dict()


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


def _check_staleness(result, tau: float, workers: int) -> dict:
    """Every step applied once, from all its shards, none older than tau versions; the histogram."""
    steps = result.metrics["steps"]
    assert [r["step"] for r in steps] == list(range(len(steps)))
    for rec in steps:
        assert sorted(shard for _, shard, _ in rec["versions"]) == list(range(workers))  # every example
        assert all(0 <= rec["step"] - v <= tau for _, _, v in rec["versions"])
    hist = result.summary["staleness_histogram"]
    assert sum(hist.values()) == workers * len(steps)
    return hist


def test_zero_staleness_and_no_backups_are_the_synchronous_step():
    """TAU = 0 and B = 0 are the defaults: the server runs the synchronous step (whose equality
    with one process, N = 1..4, is test_distributed.py's)."""
    cfg = dp.TrainConfig(staleness=0, backup_workers=0)
    assert cfg == dp.TrainConfig() and not cfg.relaxed and cfg.replicas == cfg.workers
    assert dp.TrainConfig(workers=4, backup_workers=1).replicas == 5


@pytest.mark.parametrize("tau, transport", [(2, "auto"), (1, "object_store"), (float("inf"), "auto")])
def test_bounded_staleness_never_applies_a_gradient_older_than_tau(ray_local, tau, transport):
    cfg = dp.TrainConfig(workers=3, staleness=tau, straggler="1:5", transport=transport, **BASE)
    result = dp.Trainer(cfg).fit()
    hist = _check_staleness(result, tau, 3)
    assert any(int(age) > 0 for age in hist)  # the straggler made the others run ahead
    for r in range(3):  # a worker always takes the newest parameters: its versions never go back
        mine = sorted((rec["step"], shard, v) for rec in result.metrics["steps"] for rank, shard, v in rec["versions"]
                      if rank == r)
        assert [v for _, _, v in mine] == sorted(v for _, _, v in mine)
    # the slow worker took fewer shards than each fast one
    taken = {r: sum(1 for rec in result.metrics["steps"] for rank, _, _ in rec["versions"] if rank == r)
             for r in range(3)}
    assert taken[1] < min(taken[0], taken[2])
    assert _max_rel_diff(result.params, _replay(cfg, result.metrics["steps"])) < 1e-10


@pytest.mark.parametrize("transport", ["auto", "object_store"])
def test_backup_workers_average_the_first_n_and_drop_the_late(ray_local, transport):
    cfg = dp.TrainConfig(workers=3, backup_workers=1, straggler="1:6", transport=transport,
                         **{**BASE, "model": [2, 512, 512, 2]})  # compute enough that 6x stands out of the noise
    result = dp.Trainer(cfg).fit()
    steps = result.metrics["steps"]
    for rec in steps:
        assert len(rec["counted"]) == 3 and sorted(rec["counted"] + rec["dropped"]) == [0, 1, 2, 3]
        assert rec["count"] == sum(len(BatchSampler(len(load_data(cfg)), 60, 3).shard_at(rec["step"], 4, r)[0])
                                   for r in rec["counted"])
        assert rec["timeline"]["apply"][0] >= max(end for _, _, end in rec["timeline"]["compute"]) - 1e-3
    # the 6x slower worker is the late one (allowing for this 2-core machine's scheduling noise)
    assert sum(rec["dropped"] == [1] for rec in steps) >= 0.8 * len(steps)
    assert result.summary["dropped_by_rank"]["1"] >= 0.8 * len(steps)
    assert _max_rel_diff(result.params, _replay(cfg, steps)) < 1e-10


def test_a_backup_worker_run_replays_bit_exactly_from_a_checkpoint(ray_local, tmp_path):
    """Which gradients count is timing; it is written down, so a resume from an earlier
    checkpoint counts the same ones and ends on the same bits."""
    first = tmp_path / "first"
    cfg = dp.TrainConfig(workers=3, backup_workers=1, straggler="random:6", out=str(first), checkpoint_every=8,
                         keep_checkpoints=5, **BASE)
    original = dp.Trainer(cfg).fit()
    dropped = {tuple(rec["dropped"]) for rec in original.metrics["steps"]}
    assert len(dropped) > 1  # the random straggler made different workers late
    meta = json.loads((first / "checkpoints" / "ckpt-00000016.json").read_text())
    assert meta["relaxed"]["version"] == 16 and meta["relaxed"]["backup_workers"] == 1  # what a resume needs
    assert all(step >= 16 for step, _, _ in meta["relaxed"]["not_applied"])  # computed again on resume
    again = tmp_path / "again"
    shutil.copytree(first, again)
    resumed = dp.Trainer(cfg.replace(out=str(again)), resume=True, resume_at_most=8).fit()
    assert resumed.summary["resumed_from_step"] == 8
    assert [r["counted"] for r in resumed.metrics["steps"]] == [r["counted"] for r in original.metrics["steps"][8:]]
    for name, value in original.params.items():
        assert np.array_equal(value, resumed.params[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{"staleness": 2}, {"backup_workers": 1}])
def test_a_relaxed_run_survives_a_killed_worker_and_server(ray_local, tmp_path, mode):
    """A worker's process dies, later the server's: no step is lost, every example of every step
    is applied (bounded staleness) and the run is still exactly what it records."""
    cfg = dp.TrainConfig(workers=3, straggler="2:3", out=str(tmp_path), checkpoint_every=6, **mode, **BASE)
    faults = [{"rank": 0, "step": 5, "kind": "exit"}, {"role": "server", "step": 15, "kind": "exit"}]
    result = dp.Trainer(cfg, faults=faults).fit()
    assert result.summary["failures_survived"] == 2
    assert [r["step"] for r in result.metrics["steps"]] == list(range(24))
    if "staleness" in mode:
        _check_staleness(result, 2, 3)
    assert _max_rel_diff(result.params, _replay(cfg, result.metrics["steps"])) < 1e-10


def test_the_experiments_arithmetic():
    """Slowdowns against the same mode without a straggler and against sync without one."""
    from dptrain.scaling.stragglers import parse_modes, summarize
    assert parse_modes("sync, ssp:2,ssp:inf,backup:1") == [
        ("sync", {}), ("ssp:2", {"staleness": 2.0}), ("ssp:inf", {"staleness": float("inf")}),
        ("backup:1", {"backup_workers": 1})]
    runs = [{"mode": m, "straggler": s, "time_to_target_s": t, "steps": 10, "final_test_accuracy": 0.6}
            for m, s, t in [("sync", None, 2.0), ("sync", "3:3", 5.0), ("sync", "3:3", 7.0),
                            ("backup:1", None, 2.5), ("backup:1", "3:3", 3.0), ("backup:1", "3:3", None)]]
    rows = {(r["mode"], r["straggler"]): r for r in summarize(runs, ["sync", "backup:1"])}
    assert rows[("sync", "3:3")]["time_to_target_s"] == 6.0 and rows[("sync", "3:3")]["slowdown"] == 3.0
    straggled = rows[("backup:1", "3:3")]
    assert straggled["reached"] == 1 and straggled["runs"] == 2  # a run that missed the target is not timed
    assert straggled["slowdown"] == 3.0 / 2.5 and straggled["vs_sync"] == 1.5


@pytest.mark.slow
def test_stragglers_command_end_to_end(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "strag"
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "stragglers", "--modes", "backup:1", "--workers", "2",
                        "--straggler", "1:3", "--model", "40,64,10", "--target-accuracy", "0.3", "--max-epochs", "3",
                        "--repeats", "1", "--cpus-per-worker", "0.5", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((x["mode"], x["straggler"] or "") for x in runs) == [("backup:1", ""), ("backup:1", "1:3")]
    assert all(x["curve"] and x["final_test_accuracy"] > 0 and x["dropped_by_rank"] for x in runs)
    report = (out / "report.md").read_text()
    assert report.count("| backup:1 |") == 2 and "x same mode, no straggler" in report
    assert (out / "accuracy_vs_time.png").stat().st_size > 0 and (out / "timeline.png").stat().st_size > 0
