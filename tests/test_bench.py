"""`cogradctl bench`: the JSON it documents, with consistent ratios (no timing thresholds here)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cogradctl.bench import ratio_interval
from cogradctl.cli import app


def test_bench_synthetic_json_schema():
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            "shared-bottom",
            "--synthetic",
            "--num-tasks",
            "3",
            "--methods",
            "ew,cograd,pcgrad",
            "--batch-size",
            "128",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
            "-q",
            "--config",
            "bottom=[16]",
            "--config",
            "tower=[4]",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tasks"] == 3 and doc["floor_ms"] > 0 and "CPU" in doc["device"]
    assert set(doc["methods"]) == {"ew", "cograd", "pcgrad"}
    for r in doc["methods"].values():
        assert r["step_ms"] > 0
        assert abs(r["ratio_to_floor"] - r["step_ms"] / doc["floor_ms"]) < 1e-9
        assert abs(r["ratio_to_ew"] - r["step_ms"] / doc["methods"]["ew"]["step_ms"]) < 1e-9
        assert "peak_mem_mb" in r
        lo, hi = r["ratio_to_floor_ci95"]
        assert 0 < lo <= hi
    assert doc["measure_transference"]["ratio_to_floor"] > 0
    assert len(doc["measure_transference"]["ratio_to_floor_ci95"]) == 2


def test_ratio_interval_of_exact_multiples_is_the_multiple():
    den = list(np.random.default_rng(1).lognormal(0.0, 0.3, size=50))
    assert ratio_interval(den, den) == [1.0, 1.0]
    lo, hi = ratio_interval([1.25 * t for t in den], den)
    assert lo == pytest.approx(1.25, rel=1e-12) and hi == pytest.approx(1.25, rel=1e-12)


def test_ratio_interval_covers_the_true_ratio_and_narrows_with_rounds():
    """Simulated timings: true ratio 1.1, multiplicative noise shared by both sides of a round
    (a slow spell) and independent noise on each; the 95% interval should cover 1.1 about 95% of
    the time (at least 85 of 100 here: the binomial tail below that is ~1e-4) and narrow with
    more rounds."""
    rng = np.random.default_rng(0)

    def run(rounds):
        spell = rng.lognormal(0.0, 0.3, size=rounds)
        den = 10.0 * spell * rng.lognormal(0.0, 0.05, size=rounds)
        num = 11.0 * spell * rng.lognormal(0.0, 0.05, size=rounds)
        return ratio_interval(list(num), list(den), resamples=500, seed=int(rng.integers(1 << 30)))

    runs = [run(60) for _ in range(100)]
    assert sum(lo <= 1.1 <= hi for lo, hi in runs) >= 85
    width = lambda rs: float(np.median([hi - lo for lo, hi in rs]))
    assert width([run(240) for _ in range(20)]) < 0.7 * width(runs)


def test_ratio_interval_rejects_unpaired_series():
    with pytest.raises(ValueError, match="equally long"):
        ratio_interval([1.0, 2.0], [1.0, 2.0, 3.0])


def test_bench_needs_a_model_source():
    result = CliRunner().invoke(app, ["bench", "--methods", "ew"])
    assert result.exit_code == 2
    assert "--checkpoint and --data, or --model and --synthetic" in result.output


def _fake_result(peak):
    method = {
        "step_ms": 11.0,
        "spread_ms": [9.0, 14.0],
        "ratio_to_ew": 1.0,
        "ratio_to_floor": 1.1,
        "ratio_to_floor_ci95": [0.9, 1.3],
        "peak_mem_mb": peak,
    }
    return {
        "device": "x",
        "tasks": 2,
        "batch_size": 64,
        "steps": 3,
        "shared_parameters": 10,
        "floor_ms": 10.0,
        "floor_spread_ms": [8.0, 13.0],
        "plain_ms": 6.0,
        "process_peak_rss_mb": 321.0,
        "methods": {"ew": method},
        "measure_transference": {
            "batch_ms": 12.0,
            "floor_ms": 11.0,
            "ratio_to_floor": 1.09,
            "ratio_to_floor_ci95": [1.0, 1.2],
        },
    }


def test_bench_warns_when_the_timings_are_too_noisy(monkeypatch):
    import cogradctl.bench

    monkeypatch.setattr(cogradctl.bench, "bench", lambda *a, **k: _fake_result(None))  # interval 0.9–1.3
    args = [
        "bench",
        "--model",
        "shared-bottom",
        "--synthetic",
        "--methods",
        "ew",
        "--batch-size",
        "64",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--json",
        "-q",
        "--config",
        "bottom=[4]",
        "--config",
        "tower=[2]",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "timings are noisy" in result.stderr and "raise --steps" in result.stderr
    assert json.loads(result.stdout)["methods"]["ew"]["ratio_to_floor_ci95"] == [0.9, 1.3]  # stdout stays pure JSON


@pytest.mark.parametrize("peak", [None, 87.6])
def test_the_peak_memory_column_appears_only_where_it_was_measured(monkeypatch, peak):
    """Issue #25 item 14: on the CPU there are no per-method memory statistics, so no empty column
    (the process's peak RSS is said once instead); on CUDA each method's peak is shown."""
    import cogradctl.bench

    monkeypatch.setattr(cogradctl.bench, "bench", lambda *a, **k: _fake_result(peak))
    args = ["bench", "--model", "shared-bottom", "--synthetic", "--methods", "ew", "--device", "cpu", "-q"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert ("peak MB" in result.stdout) == (peak is not None)
    ew_row = next(line for line in result.stdout.splitlines() if line.startswith("│ ew "))
    assert ew_row.rstrip(" │").endswith("88") if peak else "process peak RSS: 321 MB" in result.stdout


def test_bench_reports_each_round_to_its_progress_callback():
    """Issue #25 item 6: the bar on a terminal advances once per round (warm-up rounds included)."""
    import torch

    from cogradctl import bench as bench_mod
    from cogradctl.models import split_parameters

    schema, data, net = bench_mod.synthetic_workload("mmoe", 2, 256, {"expert": [8]}, [], torch.device("cpu"))
    split = split_parameters(net, schema.task_names, "mmoe")
    calls = []
    bench_mod.bench(net, split, schema, data, ["ew"], batch_size=128, steps=3, warmup=2, progress=calls.append)
    assert calls == [1] * 5
