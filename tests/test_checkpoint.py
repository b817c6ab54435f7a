"""Checkpoint files (dptrain/checkpoint.py) and the run folder's metrics file: formats, damage,
refusals, retention. No Ray."""

import json

import numpy as np
import pytest

import dptrain as dp
from dptrain import checkpoint
from dptrain.models import layout


def _layout(dims):
    return layout(dp.nn.MLP(dims, seed=0, dtype="float64"))


def _write(tmp_path, steps=(4, 8)):
    model = dp.nn.MLP([2, 3, 2], seed=0, dtype="float64")
    opt = dp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for s in steps:
        opt.flat.data[...] += s
        checkpoint.save(tmp_path, s, opt.flat.data, opt.state_dict(), layout(model), {"seed": 0}, keep=3)
    return opt


def test_checkpoint_round_trip_and_retention(tmp_path):
    opt = _write(tmp_path, steps=(2, 4, 6, 8))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-00000008.json", "ckpt-00000006.json",
                                                                       "ckpt-00000004.json"]
    state = checkpoint.load_latest(tmp_path, _layout([2, 3, 2]), "float64")
    assert state["step"] == 8
    np.testing.assert_array_equal(state["params"], opt.flat.data)
    assert set(state["optimizer"]["state"]) == {"momentum_buffer"}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_npz", "bad_json"])
def test_damaged_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    _write(tmp_path)
    npz, meta = tmp_path / "ckpt-00000008.npz", tmp_path / "ckpt-00000008.json"
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    elif damage == "delete_npz":
        npz.unlink()
    else:
        meta.write_text("{not json")
    state = checkpoint.load_latest(tmp_path, _layout([2, 3, 2]))
    assert state["step"] == 4
    assert "skipping checkpoint" in caplog.text


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _write(tmp_path)
    with pytest.raises(checkpoint.ModelMismatch, match=r"another model than this run's: parameter 0 is '0.weight' "
                                                        r"\(3, 2\) float64 in one and '0.weight' \(4, 2\) float64"):
        checkpoint.load_latest(tmp_path, _layout([2, 4, 2]))
    conv = dp.nn.Sequential(dp.nn.Conv1d(1, 3, 2), dp.nn.Flatten(), dp.nn.Linear(3, 2)).to("float64")
    with pytest.raises(checkpoint.ModelMismatch, match="'0.weight' \\(3, 1, 2\\)"):
        checkpoint.load_latest(tmp_path, layout(conv))


def test_format_1_checkpoints_are_read_as_mlp_layouts(tmp_path):
    opt = _write(tmp_path, steps=(3,))
    meta_path = tmp_path / "ckpt-00000003.json"
    meta = json.loads(meta_path.read_text())
    meta["format"], meta["dims"] = 1, [2, 3, 2]
    del meta["layout"]
    meta_path.write_text(json.dumps(meta))
    state = checkpoint.load_latest(tmp_path, _layout([2, 3, 2]), "float64")
    np.testing.assert_array_equal(state["params"], opt.flat.data)


def test_checkpoints_never_unpickle(tmp_path):
    _write(tmp_path)
    npz = tmp_path / "ckpt-00000008.npz"
    np.savez(npz, params=np.array([object()], dtype=object))  # a pickled payload in place of the arrays
    meta = json.loads((tmp_path / "ckpt-00000008.json").read_text())
    meta.update(npz_bytes=npz.stat().st_size, npz_sha256=checkpoint._sha256(npz))
    meta["meta_sha256"] = checkpoint._meta_sha256(meta)  # a consistent forgery: only np.load can refuse it
    (tmp_path / "ckpt-00000008.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.read(tmp_path / "ckpt-00000008.json")


@pytest.mark.parametrize("edit", ["step", "config", "step_and_name"])
def test_an_edited_checkpoint_json_is_not_trusted(tmp_path, edit, caplog):
    _write(tmp_path, steps=(4, 8))
    meta_path = tmp_path / "ckpt-00000008.json"
    meta = json.loads(meta_path.read_text())
    if edit == "config":
        meta["config"]["seed"] = 1
    else:
        meta["step"] = 6
    meta_path.write_text(json.dumps(meta))
    if edit == "step_and_name":  # renamed to match, and its checksum recomputed: the optimizer's count disagrees
        meta["optimizer"]["steps"] = 8
        meta["meta_sha256"] = checkpoint._meta_sha256(meta)
        (tmp_path / "ckpt-00000006.json").write_text(json.dumps(meta))
        meta_path.unlink()
    state = checkpoint.load_latest(tmp_path, _layout([2, 3, 2]))
    assert state["step"] == 4 and "skipping checkpoint" in caplog.text


def test_check_run_compares_the_model_the_settings_and_the_step(tmp_path):
    _write(tmp_path, steps=(4, 8))  # config {"seed": 0}
    checkpoint.check_run(tmp_path, {"seed": 0, "lr": 1.0}, _layout([2, 3, 2]), total_steps=8)  # its own run
    with pytest.raises(checkpoint.RunMismatch, match=r"written by another run \(seed 0 there, 3 here\)"):
        checkpoint.check_run(tmp_path, {"seed": 3}, _layout([2, 3, 2]), total_steps=8)
    with pytest.raises(checkpoint.RunMismatch, match="a checkpoint of step 8, beyond this run's 5 steps"):
        checkpoint.check_run(tmp_path, {"seed": 0}, _layout([2, 3, 2]), total_steps=5)
    with pytest.raises(checkpoint.ModelMismatch, match="'0.weight'"):
        checkpoint.check_run(tmp_path, {"seed": 0}, _layout([2, 5, 2]), total_steps=8)


def test_metrics_file_keeps_each_step_once_across_a_recovery(tmp_path):
    from dptrain.rundir import RunDir
    run = RunDir(str(tmp_path / "run"))
    run.open(dp.TrainConfig(dataset="moons"))
    for step in range(10):
        run.record({"kind": "step", "step": step})
    run.record({"kind": "epoch", "epoch": 0, "step": 7})
    run.rewind(6)  # a recovery back to step 6: the log rewinds the file explicitly (metrics.MetricsLog.rewind)
    run.record({"kind": "recovery", "error": "worker 1 lost", "resume_step": 6})
    for step in range(6, 12):
        run.record({"kind": "step", "step": step})
    run.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(12))
    assert [r["kind"] for r in records].count("epoch") == 0 and records[6]["kind"] == "recovery"
