"""The scaling instrument: its arithmetic, the cost model, and a tiny sweep end to end."""

import csv
import json
import math
import subprocess
import sys

import pytest

from dptrain.scaling import costmodel
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


def test_cost_model_behaves_like_the_machine_it_describes():
    """Properties a step-time model must have, whatever its formula: checked, not restated."""
    ideal = costmodel.CostInputs(compute_s_per_example=1e-4, grad_bytes=8e6, object_bytes_per_s=1e30,
                                 memory_bytes_per_s=1e30, fixed_s=0.0, optimizer_s_per_byte=0.0, cores=10**9)
    # no overheads and enough cores: strong scaling is perfect
    for row in costmodel.scaling(ideal, [1, 2, 4, 8], 256):
        assert row["speedup"] == pytest.approx(row["workers"])
    # the compute is the batch's examples at the measured rate, split over the workers
    assert costmodel.step_time(ideal, 1, 256)["step_s"] == pytest.approx(256 * 1e-4)
    # two cores: four workers compute no faster than two
    two_cores = costmodel.CostInputs(**{**INPUTS.to_dict()})
    assert costmodel.step_time(two_cores, 4, 256)["compute_s"] == pytest.approx(
        costmodel.step_time(two_cores, 2, 256)["compute_s"])
    # the fixed cost and the bytes add to every step, whatever N
    heavier = costmodel.CostInputs(**{**INPUTS.to_dict(), "fixed_s": INPUTS.fixed_s + 0.01})
    for n in (1, 2, 4):
        assert costmodel.step_time(heavier, n, 256)["step_s"] == pytest.approx(
            costmodel.step_time(INPUTS, n, 256)["step_s"] + 0.01)
    # a measured compute speedup replaces the ideal one
    measured = costmodel.CostInputs(**{**ideal.to_dict(), "parallel_speedup": {1: 1.0, 2: 1.6}})
    assert costmodel.scaling(measured, [1, 2], 256)[1]["speedup"] == pytest.approx(1.6)
    # on a cluster, the server's link: past N*, adding workers stops paying; N* is where the
    # server's bytes take as long as the compute, and K shards move it
    cluster = costmodel.CostInputs(**{**INPUTS.to_dict(), "cores": 10**9, "server_bytes_per_s": 1.25e9})
    for shards in (1, 4):
        n_star = costmodel.server_bound_workers(cluster, 256, shards=shards)
        at = costmodel.step_time(cluster, n_star, 256, shards=shards)
        assert at["network_s"] == pytest.approx(at["compute_s"], rel=1e-6)
    rows = costmodel.scaling(cluster, [1, 2, 64], 256)
    assert rows[2]["efficiency"] < rows[1]["efficiency"] < 1.0
    assert math.isinf(costmodel.server_bound_workers(INPUTS, 256))  # no network on one machine
    predicted = costmodel.step_time(INPUTS, 1, 256)["step_s"]
    assert costmodel.relative_errors(INPUTS, {1: predicted}, 256)[1] == pytest.approx(0.0)
    assert costmodel.relative_errors(INPUTS, {1: 2 * predicted}, 256)[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="workers"):
        costmodel.step_time(INPUTS, 0, 256)


def test_cost_model_of_parameters_read_in_place_and_a_threaded_update():
    """Shared memory: no parameter copy in, one pass over the gradient out; one server's adds and
    update sped up by the measured U(T) at T = 1 + N threads (within what was measured), and only
    one server's: shards keep theirs."""
    copied = costmodel.step_time(INPUTS, 2, 256)
    in_place = costmodel.CostInputs(**{**INPUTS.to_dict(), "parameters_in_place": True})
    assert costmodel.step_time(in_place, 2, 256)["transfer_s"] == pytest.approx(copied["transfer_s"] / 2)
    threaded = costmodel.CostInputs(**{**INPUTS.to_dict(), "update_speedup": {1: 1.0, 2: 1.5}})
    for n in (1, 2, 4):  # T = 1 + N = 2 threads at least, and no more were measured
        assert costmodel.step_time(threaded, n, 256)["server_s"] == pytest.approx(
            costmodel.step_time(INPUTS, n, 256)["server_s"] / 1.5)
    assert costmodel.step_time(threaded, 2, 256, shards=2)["server_s"] == pytest.approx(
        costmodel.step_time(INPUTS, 2, 256, shards=2)["server_s"])


def test_cost_model_of_compressed_gradients():
    """Fewer gradient bytes shorten the transfers and move N*; encoding costs each worker its
    time; decoding replaces the server's dense adds."""
    cluster = costmodel.CostInputs(**{**INPUTS.to_dict(), "cores": 10**9, "server_bytes_per_s": 1.25e9})
    dense, half = costmodel.step_time(cluster, 8, 256), costmodel.step_time(cluster, 8, 256, ratio=0.5)
    assert half["network_s"] == pytest.approx(dense["network_s"] * 1.5 / 2)  # parameters stay dense
    assert half["transfer_s"] == pytest.approx(dense["transfer_s"] * 1.5 / 2)
    assert half["compute_s"] == dense["compute_s"] and half["server_s"] == dense["server_s"]
    assert costmodel.server_bound_workers(cluster, 256, ratio=0.01) == pytest.approx(
        costmodel.server_bound_workers(cluster, 256) * math.sqrt(2 / 1.01))
    for ratio in (0.5, 0.01):  # at N*, the link's time equals the compute's, compressed or not
        n_star = costmodel.server_bound_workers(cluster, 256, ratio=ratio)
        at = costmodel.step_time(cluster, n_star, 256, ratio=ratio)
        assert at["network_s"] == pytest.approx(at["compute_s"], rel=1e-6)
    encoded = costmodel.step_time(cluster, 8, 256, ratio=0.5, encode_s=0.003)
    assert encoded["step_s"] == pytest.approx(half["step_s"] + 0.003)
    decoded = costmodel.step_time(cluster, 8, 256, ratio=0.5, decode_s=0.0)  # free decoding: one zeroing pass
    assert decoded["server_s"] == pytest.approx(dense["server_s"] - 7 * INPUTS.grad_bytes / INPUTS.memory_bytes_per_s)


def test_cost_model_of_sharded_servers():
    """K shards split the server's link and its work (on the cores there are) and add a round trip."""
    cluster = costmodel.CostInputs(**{**INPUTS.to_dict(), "cores": 10**9, "server_bytes_per_s": 1.25e9,
                                      "shard_call_s": 1e-3})
    one, four = costmodel.step_time(cluster, 16, 256), costmodel.step_time(cluster, 16, 256, shards=4)
    assert four["network_s"] == pytest.approx(one["network_s"] / 4)
    assert four["server_s"] == pytest.approx(one["server_s"] / 4)
    assert four["fixed_s"] == pytest.approx(one["fixed_s"] + 1e-3) and one["fixed_s"] == cluster.fixed_s
    assert four["compute_s"] == one["compute_s"] and four["transfer_s"] == one["transfer_s"]
    here = costmodel.CostInputs(**{**INPUTS.to_dict(), "shard_call_s": 1e-3})  # 2 cores: 4 shards work as 2
    assert costmodel.step_time(here, 2, 256, shards=4)["server_s"] == pytest.approx(
        costmodel.step_time(here, 2, 256, shards=2)["server_s"])
    assert costmodel.server_bound_workers(cluster, 256, shards=4) == pytest.approx(
        2 * costmodel.server_bound_workers(cluster, 256))
    apart = costmodel.step_time(here, 2, 256, shards=2, shard_s=0.007)  # the shards' update measured apart
    assert apart["server_s"] == 0.007 and apart["fixed_s"] == here.fixed_s
    assert apart["compute_s"] == costmodel.step_time(here, 2, 256, shards=2)["compute_s"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One tiny `dptrain scale` sweep (1 and 2 workers, fp16 and --servers 2 beside it), run once
    for the tests below: each checks one of its results."""
    out = tmp_path_factory.mktemp("sweep") / "scale"
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "scale", "--workers", "1,2", "--dataset", "moons",
                        "--model", "2,16,2", "--batch-size", "32", "--steps", "12", "--repeats", "1",
                        "--target-accuracy", "0.25", "--max-epochs", "3", "--cpus", "3", "--quiet",
                        "--compress", "fp16", "--servers", "2", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _runs(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_runs_both_modes_and_tabulates_medians(sweep):
    runs = _runs(sweep)
    assert {(x["mode"], x["workers"]) for x in runs} == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    weak2 = next(x for x in runs if x["mode"] == "weak" and x["workers"] == 2)
    assert weak2["batch"] == 64  # per-worker batch kept
    assert all(x["steps"] == 12 - 5 for x in runs)  # warm-up steps left out
    with open(sweep / "runs.csv") as f:
        table = list(csv.DictReader(f))
    for row in table:  # the table reports the runs: each point's time is the median of its runs
        mine = sorted(x["step_ms"] for x in runs if x["mode"] == row["mode"] and x["workers"] == int(row["workers"]))
        assert float(row["step_ms"]) == pytest.approx(mine[len(mine) // 2])
    assert {float(t["speedup"]) for t in table if t["workers"] == "1"} == {1.0}


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_measures_its_floors_and_ceiling(sweep):
    floors = json.loads((sweep / "floors.json").read_text())
    # one worker through Ray does the single process's work plus overhead; the overhead is small
    # next to the round trips it replaces (a loose bound: this is a shared machine)
    assert floors["local_step_ms"] > 0 and floors["actor_round_trip_ms"] > 0
    assert floors["tiny_transport"] == "shared memory"  # the sweep's auto transport on one node
    assert floors["one_worker_step_ms"] > 0.5 * floors["local_step_ms"]
    assert floors["driver_chained_empty_step_ms"] > floors["actor_round_trip_ms"]  # chained: several round trips
    one, two = floors["ceiling"]  # the ceiling: one process's compute time over the slowest of N on B/N each
    assert (one["workers"], one["examples_each"], two["workers"], two["examples_each"]) == (1, 32, 2, 16)
    assert two["ceiling_speedup"] == pytest.approx(one["compute_ms"] / two["compute_ms"])
    assert [p["workers"] for p in floors["paired_strong"]] == [1, 2] and floors["paired_strong"][1]["rounds"] == 1
    assert len(floors["blocks_ms"]) == 3 and floors["block_steps"] == 10
    model = json.loads((sweep / "costmodel.json").read_text())
    assert [c["workers"] for c in model["check"]] == [1, 2]


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_reports_compression_beside_dense_gradients(sweep):
    with open(sweep / "compression.csv") as f:  # --compress fp16: "none" measured beside it, bytes halved
        rows = {(r["compress"], int(r["workers"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("none", 1), ("none", 2), ("fp16", 1), ("fp16", 2)}
    for n in (1, 2):
        assert float(rows[("fp16", n)]["sent_bytes_per_worker_step"]) * 2 == float(rows[("none", n)]["sent_bytes_per_worker_step"])
        assert float(rows[("fp16", n)]["server_bytes_per_step"]) == n * float(rows[("fp16", n)]["sent_bytes_per_worker_step"])
    compression = json.loads((sweep / "compression.json").read_text())
    assert compression["costs"]["fp16"]["ratio"] == 0.5 and len(compression["time_to_accuracy"]) == 2
    assert all("predicted_ms" in r for r in compression["rows"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_reports_sharded_servers_beside_one(sweep):
    with open(sweep / "servers.csv") as f:  # --servers 2: K = 1 beside it, over the object store, half per server
        rows = {(int(r["servers"]), int(r["workers"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for n in (1, 2):
        assert float(rows[(2, n)]["sent_bytes_per_worker_step"]) == float(rows[(1, n)]["sent_bytes_per_worker_step"])
        assert float(rows[(1, n)]["server_bytes_per_step"]) == n * float(rows[(1, n)]["sent_bytes_per_worker_step"])
        assert float(rows[(2, n)]["server_bytes_cut"]) == pytest.approx(2.0, rel=0.1)  # aligned halves
    servers = json.loads((sweep / "servers.json").read_text())
    assert all("predicted_ms" in r for r in servers["rows"]) and len(servers["time_to_accuracy"]) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_writes_its_report_plots_and_time_to_accuracy(sweep):
    report = (sweep / "report.md").read_text()
    for section in ("### Strong scaling", "### Cost model", "Time to accuracy", "### Compute ceiling", "round by round",
                    "### Compressed gradients", "### Sharded parameter servers"):
        assert section in report
    for png in ("throughput.png", "efficiency.png", "loss_vs_time.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"
    tta = list(csv.DictReader(open(sweep / "time_to_accuracy.csv")))
    assert [t["workers"] for t in tta] == ["1", "2"]
    for t in tta:  # MNIST-1D at batch 256 passes 25% in its second epoch (23% after the first)
        assert float(t["time_to_target_s"]) > 0 and int(t["steps"]) <= 3 * 16
        assert float(t["final_test_accuracy"]) >= 0.25