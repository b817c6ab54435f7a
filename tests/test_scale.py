"""The scaling instrument: its arithmetic, the cost model, and a tiny sweep end to end."""

import csv
import json
import math
import subprocess
import sys

import pytest

from dptrain import costmodel
from dptrain.scaling.measure import aggregate, paired_strong, speedup_table, summarize_run


def test_speedup_and_efficiency_arithmetic():
    rows = [{"mode": "strong", "workers": 1, "step_ms": 40.0, "samples_per_s": 6400.0},
            {"mode": "strong", "workers": 2, "step_ms": 25.0, "samples_per_s": 10240.0},
            {"mode": "weak", "workers": 1, "step_ms": 40.0, "samples_per_s": 6400.0},
            {"mode": "weak", "workers": 4, "step_ms": 50.0, "samples_per_s": 20480.0}]
    strong = speedup_table(rows, "strong")
    assert [r["speedup"] for r in strong] == [1.0, 1.6] and strong[1]["efficiency"] == 0.8
    weak = speedup_table(rows, "weak")
    assert weak[1]["speedup"] == 3.2 and weak[1]["efficiency"] == 0.8


def test_run_summary_leaves_out_warmup_and_splits_the_step():
    steps = [{"time_s": 1.0, "compute_s": 1.0, "apply_s": 0.0}] * 5 + \
            [{"time_s": 0.010, "compute_s": 0.006, "apply_s": 0.001}] * 10
    run = summarize_run(steps, 2, "strong", 128, 0)
    assert run["steps"] == 10 and math.isclose(run["step_ms"], 10.0) and math.isclose(run["other_ms"], 3.0)
    assert math.isclose(run["samples_per_s"], 12800.0)
    agg = aggregate([run, dict(run, repeat=1, step_ms=12.0)])
    assert agg[0]["repeats"] == 2 and math.isclose(agg[0]["step_ms"], 11.0)


def test_paired_speedup_is_taken_within_rounds():
    # round 0 is a slow spell for every point; ratios within rounds stay 1.6 and 1.5
    runs = [{"mode": "strong", "workers": 1, "repeat": 0, "step_ms": 80.0},
            {"mode": "strong", "workers": 2, "repeat": 0, "step_ms": 50.0},
            {"mode": "strong", "workers": 1, "repeat": 1, "step_ms": 40.0},
            {"mode": "strong", "workers": 2, "repeat": 1, "step_ms": 40.0 / 1.5},
            {"mode": "strong", "workers": 1, "repeat": 2, "step_ms": 42.0},
            {"mode": "strong", "workers": 2, "repeat": 2, "step_ms": 42.0 / 1.6},
            {"mode": "weak", "workers": 2, "repeat": 0, "step_ms": 1.0}]
    ceilings = [{"workers": 1, "repeat": r, "ceiling_speedup": 1.0} for r in range(3)] + \
               [{"workers": 2, "repeat": 0, "ceiling_speedup": 2.0}, {"workers": 2, "repeat": 1, "ceiling_speedup": 1.5},
                {"workers": 2, "repeat": 2, "ceiling_speedup": 1.6}]
    one, two = paired_strong(runs, ceilings)
    assert one["speedup"] == 1.0 and one["of_ceiling"] == 1.0
    assert two["rounds"] == 3 and math.isclose(two["speedup"], 1.6) and two["ceiling"] == 1.6
    assert [round(x, 9) for x in two["speedups"]] == [1.6, 1.5, 1.6]
    assert math.isclose(two["of_ceiling"], 1.0)  # shares 0.8, 1.0, 1.0


INPUTS = costmodel.CostInputs(compute_s_per_example=1e-4, grad_bytes=8e6, object_bytes_per_s=4e9,
                              memory_bytes_per_s=8e9, fixed_s=2e-3, optimizer_s_per_byte=5e-10, cores=2)


def test_cost_model_formula_on_made_up_inputs():
    t1 = costmodel.step_time(INPUTS, 1, 256)
    # 2 ms fixed + 25.6 ms compute + 2 * 8e6 / 4e9 = 4 ms transfer + 1 ms sum + 4 ms optimizer
    assert math.isclose(t1["step_s"], 0.002 + 0.0256 + 0.004 + 0.001 + 0.004)
    t4 = costmodel.step_time(INPUTS, 4, 256)
    assert math.isclose(t4["compute_s"], 0.0128)  # 2 cores: 4 workers compute two at a time
    assert math.isclose(t4["transfer_s"], 2 * 0.004)  # and copy two at a time
    assert math.isclose(t4["server_s"], 4 * 0.001 + 0.004)
    cluster = costmodel.CostInputs(**{**INPUTS.to_dict(), "cores": 10**9, "server_bytes_per_s": 1.25e9})
    t8 = costmodel.step_time(cluster, 8, 256, shards=4)
    assert math.isclose(t8["network_s"], 2 * 8 * 8e6 / (4 * 1.25e9))
    rows = costmodel.scaling(cluster, [1, 2, 64], 256)
    assert rows[0]["speedup"] == 1.0 and rows[2]["efficiency"] < rows[1]["efficiency"]
    n_star = costmodel.server_bound_workers(cluster, 256)
    assert math.isclose(n_star, math.sqrt(1e-4 * 256 * 1.25e9 / (2 * 8e6)))
    assert costmodel.server_bound_workers(cluster, 256, shards=4) == pytest.approx(2 * n_star)
    assert math.isinf(costmodel.server_bound_workers(INPUTS, 256))
    # a measured compute speedup P(N) replaces N / share: 2 workers at 1.6, not 2
    here = costmodel.CostInputs(**{**INPUTS.to_dict(), "parallel_speedup": {1: 1.0, 2: 1.6}})
    assert math.isclose(costmodel.step_time(here, 2, 256)["compute_s"], 0.0256 / 1.6)
    assert math.isclose(costmodel.step_time(here, 1, 256)["step_s"], t1["step_s"])
    errors = costmodel.relative_errors(INPUTS, {1: t1["step_s"] * 1.1}, 256)
    assert math.isclose(errors[1], 1 / 11)
    with pytest.raises(ValueError, match="workers"):
        costmodel.step_time(INPUTS, 0, 256)


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "scale"
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "scale", "--workers", "1,2", "--dataset", "moons",
                        "--model", "2,16,2", "--batch-size", "32", "--steps", "12", "--repeats", "1",
                        "--target-accuracy", "0.8", "--max-epochs", "5", "--cpus", "3", "--quiet",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {(x["mode"], x["workers"]) for x in runs} == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    weak2 = next(x for x in runs if x["mode"] == "weak" and x["workers"] == 2)
    assert weak2["batch"] == 64  # per-worker batch kept
    with open(out / "runs.csv") as f:
        table = list(csv.DictReader(f))
    for row in table:
        base = next(t for t in table if t["mode"] == row["mode"] and t["workers"] == "1")
        n = int(row["workers"])
        if row["mode"] == "strong":
            expected = float(base["step_ms"]) / float(row["step_ms"])
        else:
            expected = float(row["samples_per_s"]) / float(base["samples_per_s"])
        assert math.isclose(float(row["speedup"]), expected, rel_tol=1e-9)
        assert math.isclose(float(row["efficiency"]), expected / n, rel_tol=1e-9)
    floors = json.loads((out / "floors.json").read_text())
    assert floors["local_step_ms"] > 0 and floors["actor_round_trip_ms"] > 0
    assert floors["driver_chained_empty_step_ms"] > 0
    assert [c["workers"] for c in floors["ceiling"]] == [1, 2] and floors["ceiling"][0]["ceiling_speedup"] == 1.0
    assert [p["workers"] for p in floors["paired_strong"]] == [1, 2] and floors["paired_strong"][1]["rounds"] == 1
    assert len(floors["blocks_ms"]) == 3 and floors["block_steps"] == 10
    assert math.isclose(floors["one_worker_overhead"], floors["one_worker_step_ms"] / floors["local_step_ms"] - 1)
    model = json.loads((out / "costmodel.json").read_text())
    assert [c["workers"] for c in model["check"]] == [1, 2]
    report = (out / "report.md").read_text()
    assert "### Strong scaling" in report and "### Cost model" in report and "Time to accuracy" in report
    assert "### Compute ceiling" in report and "round by round" in report
    for png in ("throughput.png", "efficiency.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    tta = list(csv.DictReader(open(out / "time_to_accuracy.csv")))
    assert [t["workers"] for t in tta] == ["1", "2"]
