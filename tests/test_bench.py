"""The engine benchmark runs and writes what it reports (its timings are not asserted: see README)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dptrain.scaling.bench import BATCH

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_engine_benchmark_quick_run(tmp_path):
    out = tmp_path / "engine.json"
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "bench", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    small, large = results["mlps"]["40-256-256-10"], results["mlps"]["784-1024-1024-10"]
    # the large model does 20x the arithmetic per example: both implementations must see that
    # (a timer that measured something else, or nothing, would not)
    assert large["hand_ms"] > 3 * small["hand_ms"] and large["engine_ms"] > 3 * small["engine_ms"]
    for dims, res in (([40, 256, 256, 10], small), ([784, 1024, 1024, 10], large)):
        # a step must hold at least its hidden activations and their gradients (float32)
        activations = BATCH * sum(dims[1:]) * 4
        assert res["memory"]["engine_peak_bytes"] >= activations
        assert res["memory"]["hand_peak_bytes"] >= activations
    assert results["memory_growth"]["gc_objects_collected"] == 0  # no reference cycles in the graph
    assert results["memory_growth"]["growth_bytes"] < 2**20  # nothing kept from step to step
    # the scalar engine pays per element what the tensor engine pays per array
    assert results["value_engine"]["tensor_speedup"] > 10
    assert set(results["layers"]) == {"convbase_batch100", "transformer_block"}
    for res in results["layers"].values():  # each checked against the hand-written step's loss before timing
        assert res["hand_ms"] > 0 and res["engine_ms"] > 0
    assert "ratio" in r.stdout and "wrote" in r.stdout
    machine = results["machine"]  # what the figures were measured on, the BLAS's kernels included
    assert machine["cpus"] >= 1 and machine["numpy"] and "blas_kernels" in machine


@pytest.mark.parametrize("core", ["Haswell", "Sandybridge"])
def test_blas_kernels_names_the_kernels_openblas_runs(core):
    """The kernels asked for with OPENBLAS_CORETYPE are those named, in a fresh process (the
    choice is made when numpy loads its OpenBLAS)."""
    code = "import dptrain.backend as b; print(b.blas_kernels())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if plain.stdout.strip() == "None":
        pytest.skip("numpy's BLAS here is not an OpenBLAS that names its kernels")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OPENBLAS_CORETYPE": core})
    assert r.stdout.strip() == core, r.stderr


def test_the_recipe_benchmark_refuses_bad_flags_before_running(tmp_path, capsys):
    """dptrain bench --recipe: one line naming the flag and exit 2, nothing started or written."""
    from dptrain.scaling import bench_recipe
    text, out = tmp_path / "t.txt", tmp_path / "r.json"
    text.write_text("some text\n")
    for flags, said in [(["--text", str(tmp_path / "none.txt")], "--text"), (["--steps", "0"], "--steps must be > 20"),
                        (["--text", str(text), "--steps", "20"], "--steps must be > 20"),
                        (["--text", str(text), "--runs", "dptrain:0"], "--runs: 'dptrain:0'"),
                        (["--text", str(text), "--runs", "jax:1"], "--runs: 'jax:1'")]:
        assert bench_recipe.main(["--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "bench", "--recipe", "--out", str(out), "--text",
                        str(tmp_path / "none.txt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--text" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_the_update_benchmark_writes_each_setting_beside_its_floor(tmp_path, capsys):
    """dptrain bench --update's measurement, small (17 blocks: 2 threads do run): every optimizer and
    thread count has its update time, the floor of a memory pass of its bytes, and the update's
    parameters equal across threads."""
    from dptrain.scaling import bench_update
    out = tmp_path / "update.json"
    assert bench_update.main(["--sizes", "1100000", "--threads", "1,2", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["optimizer"], r["threads"]) for r in rows} == {(o, t) for o in bench_update.SETTINGS for t in (1, 2)}
    assert all(r["bit_for_bit"] and r["update_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert rows[0]["bytes"] == 1100000 * 4 * (2 + 1 + 2)  # sgd: two gradients read, the mean, the parameter
    with pytest.raises(SystemExit):
        bench_update.main(["--threads", "0", "--out", str(out)])
    assert "--sizes, --threads, --workers and --repeats must be >= 1" in capsys.readouterr().err


@pytest.mark.ray
def test_the_step_benchmark_splits_the_tiny_step_into_parts_that_add_up(ray_local, tmp_path):
    """dptrain bench --step, short: the tiny model's step on 2 shared-memory workers, by part; the
    parts of each step add up to it, and a worker's computation is timed alone beside it."""
    import statistics
    from dptrain.scaling import bench_step
    records = []
    for step in range(60):  # a step's record as the server writes it (wall clock), 1 ms apart
        t = 100.0 + step * 1e-3
        records.append({"step": step, "time_s": 0.5e-3, "timeline": {
            "compute": [[0, t + 0.1e-3, t + 0.3e-3], [1, t + 0.15e-3, t + 0.32e-3]], "apply": [t + 0.4e-3, t + 0.5e-3]}})
    p = {k: statistics.median(v) for k, v in bench_step.parts(records).items()}
    assert p["request"] == pytest.approx(0.1e-3) and p["stagger"] == pytest.approx(0.05e-3)
    assert p["compute"] == pytest.approx(0.17e-3) and p["reply"] == pytest.approx(0.08e-3)
    assert p["update"] == pytest.approx(0.1e-3) and p["between"] == pytest.approx(0.5e-3)
    assert sum(p[k] for k in ("request", "stagger", "compute", "reply", "update")) == pytest.approx(p["step"])
    out = tmp_path / "step.json"
    assert bench_step.main(["--steps", "120", "--out", str(out)]) == 0
    ms = json.loads(out.read_text())["ms"]
    assert json.loads(out.read_text())["shared_memory_workers"] == 2
    assert all(ms[k] > 0 for k in ("step", "compute", "each", "alone", "update"))
    assert ms["request"] + ms["stagger"] + ms["compute"] + ms["reply"] + ms["update"] == pytest.approx(ms["step"], rel=0.5)
    busy = json.loads(out.read_text())["busy"]  # the cores' busy share over those steps, and the idle core-time
    assert 0 < busy <= 1 and ms["idle_core"] >= 0
    assert json.loads(out.read_text())["model"] == "2-8-2"


def test_the_step_benchmark_names_a_bad_model(capsys):
    from dptrain.scaling import bench_step
    for bad in ("7", "784,1024,1", "a,b"):
        with pytest.raises(SystemExit) as e:
            bench_step.main(["--model", bad])
        assert e.value.code == 2 and f"argument --model: {bad!r} is not an MLP's widths" in capsys.readouterr().err
