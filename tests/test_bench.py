"""The engine benchmark runs and writes what it reports (its timings are not asserted: see README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_engine_benchmark_quick_run(tmp_path):
    out = tmp_path / "engine.json"
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "bench", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["mlps"]) == {"40-256-256-10", "784-1024-1024-10"}
    for res in results["mlps"].values():
        assert res["hand_ms"] > 0 and res["engine_ms"] > 0
        assert res["ratio"] == pytest.approx(res["engine_ms"] / res["hand_ms"])
        assert res["memory"]["engine_peak_bytes"] > 0
    assert results["memory_growth"]["gc_objects_collected"] == 0  # no reference cycles in the graph
    assert results["value_engine"]["tensor_speedup"] > 1
    assert set(results["layers"]) == {"convbase_batch100", "transformer_block"}
    for res in results["layers"].values():  # each checked against the hand-written step's loss first
        assert res["ratio"] == pytest.approx(res["engine_ms"] / res["hand_ms"])
    assert "ratio" in r.stdout and "wrote" in r.stdout
