"""`cogradctl bench --embeddings MODE --table-rows N`: the synthetic model's hashed tables, the row-sparse
floor and steps, and a report whose floor and ratios are the measured times' (no timing thresholds)."""

import json
import statistics

import pytest
import torch
from typer.testing import CliRunner

from cogradctl import bench as bench_mod
from cogradctl import models
from cogradctl.cli import app

SMALL = ["--config", "num_experts=2", "--config", "expert=[8]", "--config", "tower=[4]"]


def run_bench(*extra: str):
    args = ["bench", "--model", "mmoe", "--synthetic", "--num-tasks", "2", "--methods", "ew,cograd"]
    args += ["--batch-size", "64", "--steps", "3", "--warmup", "1", "--device", "cpu", "-q", *SMALL, *extra]
    return CliRunner().invoke(app, args)


def table_rows(table_rows):
    """The synthetic mmoe's embedding rows and the schema, built as bench builds it."""
    schema, _, net = bench_mod.synthetic_workload("mmoe", 2, 256, {"embedding_dim": 16}, [], "cpu", 0, table_rows)
    return net.input.embedding.weight.shape, schema


def test_table_rows_adds_two_id_features_hashed_into_that_many_rows_each():
    (plain, dim), _ = table_rows(None)
    (rows, dim2), schema = table_rows(1000)
    assert dim == dim2 == 16
    assert rows - plain == 2 * 1000  # two features of 1000 rows each, in the one shared table
    for name in bench_mod.ID_FEATURES:
        feature = next(f for f in schema.categorical if f.name == name)
        assert feature.cardinality == 1000


def test_coordinate_bench_reports_the_measured_times_and_the_tables(monkeypatch):
    measured = {}
    real = bench_mod._time_rounds

    def recording(candidates, *args):  # the real rounds; their times kept to check the report against
        measured["names"] = set(candidates)
        times, peaks = real(candidates, *args)
        measured["times"] = times
        return times, peaks

    monkeypatch.setattr(bench_mod, "_time_rounds", recording)
    result = run_bench("--embeddings", "coordinate", "--table-rows", "2^10", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    times = measured["times"]
    # no measure-transference batch with row-sparse tables (not row-sparse yet)
    assert measured["names"] == {"floor", "plain", "method:ew", "method:cograd"}
    assert doc["measure_transference"] is None
    assert doc["floor_ms"] == statistics.median(times["floor"])
    assert doc["plain_ms"] == statistics.median(times["plain"])
    for name, r in doc["methods"].items():
        assert r["step_ms"] == statistics.median(times[f"method:{name}"])
        assert r["ratio_to_floor"] == pytest.approx(r["step_ms"] / doc["floor_ms"], rel=1e-12)
        assert r["ratio_to_floor_ci95"] == bench_mod.ratio_interval(times[f"method:{name}"], times["floor"])
    e = doc["embeddings"]
    (rows, dim), _ = table_rows(1 << 10)
    assert e["mode"] == "coordinate"
    assert e["tables"] == [{"name": "input.embedding.weight", "rows": rows, "dim": 16}]
    assert e["numbers"] == rows * dim
    assert e["tables_and_adam_mb"] == pytest.approx(3 * 4 * rows * dim / 2**20)
    # 64 rows × (the sample's categorical features + 2 ids) lookups; the two id columns alone touch
    # close to 2 × 64 distinct rows (40-bit ids hashed into 1024 rows: a few collide)
    assert 100 < e["touched_rows"] <= 64 * len(table_rows(1 << 10)[1].categorical)
    # the shared parameters the methods coordinate besides the tables: the dense run's, less the table
    dense = json.loads(run_bench("--embeddings", "dense", "--table-rows", "2^10", "--json").stdout)
    assert dense["shared_parameters"] == doc["shared_parameters"] + e["numbers"]
    assert dense["embeddings"]["touched_rows"] is None and dense["measure_transference"] is not None


def test_row_sparse_floor_includes_the_tables_sparse_gradients():
    schema, data, net = bench_mod.synthetic_workload("mmoe", 2, 128, {"embedding_dim": 16, "expert": [8]}, [], "cpu")
    split = models.split_parameters(net, schema.task_names, "mmoe")
    from cogradctl import tables

    tables.separate(net, split, "sum")
    candidates, _ = bench_mod._candidates(net, split, schema, ["ew"], {}, torch.device("cpu"), "sum")
    seen = []
    real = torch.autograd.grad

    def grad(outputs, inputs, **kw):
        out = real(outputs, inputs, **kw)
        seen.extend(g for p, g in zip(inputs, out) if any(p is t for t in split.tables))
        return out

    inputs, labels = data.batch(slice(0, 64))
    torch.autograd.grad = grad
    try:
        candidates["floor"](inputs, labels)
    finally:
        torch.autograd.grad = real
    assert len(seen) == 2 and all(g.is_sparse for g in seen)  # one per task, sparse
    candidates["plain"](inputs, labels)  # the summed loss's sparse gradient through lazy_step
    candidates["method:ew"](inputs, labels)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--table-rows", "2^40"], "--table-rows '2^40'"),
        (["--table-rows", "lots"], "--table-rows 'lots'"),
        (["--table-rows", "0"], "--table-rows '0'"),
        (["--embeddings", "sparse"], "--embeddings 'sparse'"),
        (["--embeddings", "coordinate", "--table-rows", "64", "-o", "cograd.hessian=fisher-ema"], "fisher-ema"),
    ],
)
def test_bad_options_exit_2_with_one_line(extra, message):
    result = run_bench(*extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_table_rows_needs_synthetic(tmp_path):
    result = CliRunner().invoke(
        app, ["bench", "--checkpoint", str(tmp_path / "x"), "--data", str(tmp_path), "--table-rows", "8"]
    )
    assert result.exit_code == 2 and "--table-rows" in result.output
