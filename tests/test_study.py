"""benchmarks/study.py end to end at its tiny size (in this interpreter), its statistics against hand
computation, and its markdown against the step records it wrote (recomputed here independently)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_study()  # puts benchmarks/ on sys.path: its parts are the package evidence
sys.path.insert(0, str(ROOT / "benchmarks"))
from evidence import config, report, stats  # noqa: E402


def test_t_quantiles_and_verdicts():
    """The 95 % t quantiles against scipy (when installed); intervals and verdicts by hand."""
    try:
        import scipy.stats as scipy_stats
    except ImportError:
        scipy_stats = None
    if scipy_stats is not None:
        for df, q in enumerate(stats.T975, start=1):
            assert q == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4)
    # d = 1, 2, 3: mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.4843 → the interval holds 0.
    p = stats.paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert p["mean"] == pytest.approx(2.0) and p["n"] == 3
    assert p["lo"] == pytest.approx(2 - 4.303 / math.sqrt(3)) and p["hi"] == pytest.approx(2 + 4.303 / math.sqrt(3))
    assert p["verdict"] == "no detectable difference"
    # d = 1.0, 1.1, 0.9 (sd 0.1): 1 ± 0.2484 excludes 0 → better; the opposite sign → worse.
    assert stats.paired({0: 1.0, 1: 1.1, 2: 0.9}, {0: 0.0, 1: 0.0, 2: 0.0})["verdict"] == "better"
    assert stats.paired({0: -1.0, 1: -1.1, 2: -0.9}, {0: 0.0, 1: 0.0, 2: 0.0})["verdict"] == "worse"
    # Only the seeds both sides have are paired; under two, no interval.
    assert stats.paired({0: 1.0, 5: 2.0}, {0: 0.0, 1: 0.0}) is None
    # Δm% by hand: tasks at +1 % and −3 % of their single-task AUCs → −1 %.
    assert stats.delta_m({"a": 0.808, "b": 0.679}, {"a": 0.8, "b": 0.7}) == pytest.approx(-1.0)
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Of the 6 orderings of 3 points, two (identity and reversal) reach |ρ| = 1: p = 1/3.
    assert stats.spearman_p([1, 2, 3], [5, 6, 7]) == pytest.approx(1 / 3)


def test_running_time_by_hand():
    """Steps [0, 10], [5, 15], [20, 30], then [1000, 1010]: 15 + 10 + 10 s running, in 2 sittings (the
    5 s gap stays in one, the 970 s gap starts another; the overlap is counted once)."""
    steps = [{"started": a, "seconds": b - a} for a, b in ((20, 30), (0, 10), (5, 15), (1000, 1010))]
    assert report.running_time(steps) == (35.0, 2)
    assert report.running_time([{"started": 0, "seconds": 10}, {"started": 2, "seconds": 3}]) == (10.0, 1)
    assert report.running_time([]) == (0.0, 0)


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """The first table under ``heading``: {first cell: cells}."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in lines[start + 2 : end]]
    return {c[0]: c for c in cells}


def record(steps: Path, key: str) -> dict:
    return json.loads((steps / f"{key}.json").read_text())["result"]


def test_tiny_study_end_to_end(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results.md"
    study.main(["--out", str(out), "--tiny", "--in-process", "--results", str(results)])
    md, steps, cfg = results.read_text(), out / "steps", config.TINY
    assert "complete." in md and "PARTIAL" not in md
    seeds, tasks = cfg["seeds"], ["a", "b"]
    # A single-task model's features leave out the other task's label (it would leak into the reference).
    assert "b" not in record(steps, "syn+0-init-a-s0")["features"] and "b" in record(steps, "syn+0-init-s0")["tasks"]
    assert "a" not in record(steps, "syn+0-init-b-s1")["features"]
    for proto in ("scratch", "finetune"):
        name = f"syn+0-{proto}"
        # CoGrad's γ: the grid's best seed-0 mean validation AUC, from train's own JSON.
        grid = {
            g: statistics.fmean(record(steps, f"{name}-cograd-g{g:g}-s0")["after"]["tasks"][t]["auc"] for t in tasks)
            for g in cfg["cograd_grid"]
        }
        gamma = max(grid, key=grid.get)
        rows = table(md, f"## syn+0 — {proto}")
        assert f"cograd (γ={gamma:g})" in rows, rows.keys()

        def test_auc(key):
            return {t: v["auc"] for t, v in record(steps, f"{key}-test")["tasks"].items()}

        single = {t: statistics.fmean(test_auc(f"{name}-single-{t}-s{s}")[t] for s in seeds) for t in tasks}
        dm = {
            m: [
                statistics.fmean((test_auc(f"{name}-{k}-s{s}")[t] - single[t]) / single[t] * 100 for t in tasks)
                for s in seeds
            ]
            for m, k in (("ew", "ew"), ("cograd", f"cograd-g{gamma:g}"))
        }
        diff = [c - e for c, e in zip(dm["cograd"], dm["ew"])]
        mean, half = statistics.fmean(diff), 12.706 * statistics.stdev(diff) / math.sqrt(2)
        row = rows[f"cograd (γ={gamma:g})"]
        assert row[5] == f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
        assert row[6] == ("better" if mean - half > 0 else "worse" if mean + half < 0 else "no detectable difference")
        for t, cell in zip(tasks, row[2:4]):
            values = [test_auc(f"{name}-cograd-g{gamma:g}-s{s}")[t] for s in seeds]
            assert cell == f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
    hess = table(md, "## CoGrad's Hessian, isolated")
    assert {"ew", "cograd exact-g0.1", "cograd diag-g0.1"} <= set(hess)
    meas = record(steps, "syn+0-measure")
    ratio = statistics.fmean(
        meas["transference_rel"][i][j] / meas["transference_rel"][i][i] for i, j in ((0, 1), (1, 0))
    )
    assert table(md, "## Does measurement predict the outcome?")["syn+0"][2] == f"{ratio:+.3f}"
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "results-gain.png").stat().st_size > 1000
    except ImportError:
        pass

    # A lost step: --report-only runs nothing and marks the file PARTIAL, naming the missing cell.
    (steps / "syn+0-finetune-ew-s1-test.json").unlink()
    study.main(["--out", str(out), "--tiny", "--report-only", "--results", str(results)])
    md = results.read_text()
    assert "**PARTIAL**" in md and "syn+0/finetune/ew (seeds 1)" in md
    assert not (steps / "syn+0-finetune-ew-s1-test.json").exists()
