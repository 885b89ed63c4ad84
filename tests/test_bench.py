"""`cogradctl bench`: the JSON it documents, with consistent ratios (no timing thresholds here)."""

import json

from typer.testing import CliRunner

from cogradctl.cli import app


def test_bench_synthetic_json_schema():
    result = CliRunner().invoke(app, ["bench", "--model", "shared-bottom", "--synthetic", "--num-tasks", "3", "--methods", "ew,cograd,pcgrad",
                                      "--batch-size", "128", "--steps", "3", "--warmup", "1", "--device", "cpu", "--json", "-q",
                                      "--config", "bottom=[16]", "--config", "tower=[4]"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tasks"] == 3 and doc["floor_ms"] > 0 and "CPU" in doc["device"]
    assert set(doc["methods"]) == {"ew", "cograd", "pcgrad"}
    for name, r in doc["methods"].items():
        assert r["step_ms"] > 0
        assert abs(r["ratio_to_floor"] - r["step_ms"] / doc["floor_ms"]) < 1e-9
        assert abs(r["ratio_to_ew"] - r["step_ms"] / doc["methods"]["ew"]["step_ms"]) < 1e-9
        assert "peak_mem_mb" in r
    assert doc["measure_transference"]["ratio_to_floor"] > 0


def test_bench_needs_a_model_source():
    result = CliRunner().invoke(app, ["bench", "--methods", "ew"])
    assert result.exit_code == 2
    assert "--checkpoint and --data, or --model and --synthetic" in result.output
