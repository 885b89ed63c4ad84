"""Parquet resolution, schema inference, encoding and validation (cogradctl.data)."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogradctl import data
from cogradctl.errors import DataError, UsageError
from cogradctl.schema import Schema

TASKS = ["click", "like", "share"]
BINARY = {t: "binary" for t in TASKS}


def write(path, table: pa.Table):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def train_table(sample_dir) -> pa.Table:
    return pq.read_table(sample_dir / "train.parquet")


@pytest.fixture(scope="module")
def schema(sample_dir) -> Schema:
    s, rows = data.infer_schema(str(sample_dir / "train.parquet"), TASKS, BINARY)
    assert rows == 2000
    return s


def replaced(table: pa.Table, column: str, values, type=None) -> pa.Table:
    """``table`` with ``column`` replaced by ``values`` (kept at the same position)."""
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(values, type=type))


# ---------------------------------------------------------------------------- resolve


def test_resolve_single_file(sample_dir):
    assert data.resolve(str(sample_dir / "train.parquet")) == [sample_dir / "train.parquet"]


def test_resolve_directory_is_recursive_sorted_and_parquet_only(tmp_path, train_table):
    small = train_table.slice(0, 10)
    b = write(tmp_path / "b.parquet", small)
    a = write(tmp_path / "sub" / "deeper" / "a.parquet", small)
    c = write(tmp_path / "a.parquet", small)
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "dir.parquet").mkdir()  # a directory named like a file is not a file
    assert data.resolve(str(tmp_path)) == sorted([a, b, c])


def test_resolve_glob(tmp_path, train_table):
    small = train_table.slice(0, 10)
    top = [write(tmp_path / f"part-{i}.parquet", small) for i in (2, 0, 1)]
    nested = write(tmp_path / "x" / "part-9.parquet", small)
    write(tmp_path / "other.parquet", small)
    assert data.resolve(str(tmp_path / "part-*.parquet")) == sorted(top)
    assert data.resolve(str(tmp_path / "**" / "part-*.parquet")) == sorted([*top, nested])


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match="no such file") as err:
        data.resolve(str(missing))
    assert str(missing) in str(err.value)


def test_resolve_directory_without_parquet(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no \*\.parquet") as err:
        data.resolve(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_resolve_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(DataError, match="matches no files") as err:
        data.resolve(pattern)
    assert pattern in str(err.value)


def test_data_errors_are_input_errors():
    assert DataError.exit_code == 2


# ---------------------------------------------------------------------------- schema inference


@pytest.fixture
def mixed(tmp_path):
    """One column of each Arrow type inference must handle, and two binary labels."""
    table = pa.table(
        {
            "x": pa.array([1.0, 2.0, 4.0, None, 8.0, 3.0], type=pa.float32()),
            "i": pa.array([5, 7, 5, 9, 5, 7], type=pa.int32()),
            "s": pa.array(["b", "c", "b", None, "a", "b"], type=pa.string()),
            "d": pa.array(["u", "v", "v", "v", "u", "w"]).dictionary_encode(),
            "flag": pa.array([True, False, True, True, None, True]),
            "y": pa.array([0, 1, 0, 1, 1, 0], type=pa.int8()),
            "z": pa.array([True, False, False, False, True, True]),
        }
    )
    return write(tmp_path / "mixed.parquet", table), table


def infer(path, **kw):
    return data.infer_schema(
        str(path), kw.pop("tasks", ["y", "z"]), kw.pop("types", {"y": "binary", "z": "binary"}), **kw
    )


def by_name(schema: Schema) -> dict:
    return {f.name: f for f in schema.features}


def test_infer_kinds_vocabularies_and_stats(mixed):
    path, table = mixed
    schema, rows = infer(path)
    assert rows == 6
    assert schema.task_names == ["y", "z"]
    assert [f.name for f in schema.features] == ["x", "i", "s", "d", "flag"]  # file order, tasks left out
    f = by_name(schema)
    assert {n: v.kind for n, v in f.items()} == {
        "x": "dense",
        "i": "categorical",
        "s": "categorical",
        "d": "categorical",
        "flag": "categorical",
    }
    x = np.array([1.0, 2.0, 4.0, 8.0, 3.0])  # the null is not part of the statistics
    assert f["x"].mean == pytest.approx(x.mean(), rel=1e-12)
    assert f["x"].std == pytest.approx(x.std(), rel=1e-9)
    # vocabularies: most frequent first, ties by value; nulls are not vocabulary entries
    assert f["i"].vocab == [5, 7, 9] and f["i"].value_type == "int"
    assert f["s"].vocab == ["b", "a", "c"] and f["s"].value_type == "str"
    assert f["d"].vocab == ["v", "u", "w"] and f["d"].value_type == "str"
    assert f["flag"].vocab == [1, 0] and f["flag"].value_type == "int"
    assert f["s"].cardinality == 4  # + the OOV/missing bucket


def test_infer_constant_dense_column_gets_unit_std(tmp_path):
    path = write(tmp_path / "c.parquet", pa.table({"x": pa.array([2.5] * 4), "y": pa.array([0, 1, 0, 1])}))
    (x,) = infer(path, tasks=["y"], types={"y": "binary"})[0].features
    assert x.mean == 2.5 and x.std == 1.0  # no division by zero when standardising


def test_infer_stats_over_several_files_match_numpy(tmp_path, train_table):
    write(tmp_path / "a.parquet", train_table.slice(0, 700))
    write(tmp_path / "b.parquet", train_table.slice(700, 1300))
    schema, rows = data.infer_schema(str(tmp_path), TASKS, BINARY)
    assert rows == 2000
    for f in schema.dense:
        col = train_table.column(f.name).to_numpy().astype(np.float64)
        assert f.mean == pytest.approx(col.mean(), abs=1e-9)
        assert f.std == pytest.approx(col.std(), rel=1e-6)
    counts = {f.name: len(f.vocab) for f in schema.categorical}
    assert counts["device"] == len(set(train_table.column("device").to_pylist()))


def test_dense_and_categorical_overrides(mixed):
    path, _ = mixed
    schema, _ = infer(path, dense=["i"], categorical=["x"])
    f = by_name(schema)
    assert f["i"].kind == "dense"
    assert f["i"].mean == pytest.approx(np.mean([5, 7, 5, 9, 5, 7]))
    assert f["x"].kind == "categorical"
    assert len(f["x"].vocab) == 5  # five distinct non-null floats


def test_override_conflicts_and_bad_overrides(mixed):
    path, _ = mixed
    with pytest.raises(UsageError, match="both --dense and --categorical"):
        infer(path, dense=["i"], categorical=["i"])
    with pytest.raises(DataError, match="'s'.*--dense needs a numeric column"):
        infer(path, dense=["s"])
    with pytest.raises(DataError, match="no column 'nope'") as err:
        infer(path, categorical=["nope"])
    assert str(path) in str(err.value)


def test_features_narrow_the_schema(mixed):
    path, _ = mixed
    schema, _ = infer(path, features=["s", "x"])
    assert [f.name for f in schema.features] == ["s", "x"]
    assert schema.columns == ["s", "x", "y", "z"]


def test_features_naming_a_missing_column(mixed):
    path, _ = mixed
    with pytest.raises(DataError, match="no column 'ghost'"):
        infer(path, features=["x", "ghost"])


def test_missing_task_column_at_inference(mixed):
    path, _ = mixed
    with pytest.raises(DataError, match="no column 'clicks'") as err:
        infer(path, tasks=["clicks"], types={"clicks": "binary"})
    assert str(path) in str(err.value)


def test_max_vocab_and_min_count(tmp_path):
    values = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"] * 2 + ["e"]
    path = write(tmp_path / "v.parquet", pa.table({"s": values, "y": [0, 1] * 7 + [0]}))
    kw = dict(tasks=["y"], types={"y": "binary"})
    assert infer(path, **kw)[0].features[0].vocab == ["a", "b", "c", "d", "e"]
    assert infer(path, max_vocab=2, **kw)[0].features[0].vocab == ["a", "b"]
    assert infer(path, min_count=3, **kw)[0].features[0].vocab == ["a", "b", "c"]
    assert infer(path, min_count=2, max_vocab=3, **kw)[0].features[0].vocab == ["a", "b", "c"]


def test_regression_task_accepts_real_labels(tmp_path):
    path = write(tmp_path / "r.parquet", pa.table({"x": [1.0, 2.0, 3.0], "dwell": [0.5, 12.25, 3.0]}))
    schema, _ = infer(path, tasks=["dwell"], types={"dwell": "regression"})
    ds = data.load(str(path), schema)
    assert ds.labels[:, 0].tolist() == [0.5, 12.25, 3.0]
    with pytest.raises(DataError, match="dwell"):
        infer(path, tasks=["dwell"], types={"dwell": "binary"})


# ---------------------------------------------------------------------------- encoding


def test_encoding_known_oov_and_null_categoricals(mixed, tmp_path):
    path, _ = mixed
    schema, _ = infer(path)
    new = pa.table(
        {
            "x": pa.array([1.0, None, 8.0], type=pa.float32()),
            "i": pa.array([9, 42, None], type=pa.int64()),  # another int width than at init
            "s": pa.array(["a", "zzz", None]),
            "d": pa.array(["w", "u", "new"]).dictionary_encode(),
            "flag": pa.array([False, None, True]),
            "y": pa.array([1, 0, 1], type=pa.int8()),
            "z": pa.array([0, 0, 1], type=pa.int64()),
        }
    )
    other = write(tmp_path / "new.parquet", new)
    with pytest.warns(UserWarning, match="out-of-vocabulary row") as caught:
        ds = data.load(str(other), schema)
    message = str(caught[0].message)
    assert "d: 1 row, 1 distinct value; i: 1 row, 1 distinct value; s: 1 row, 1 distinct value" in message
    assert ds.oov == {"i": 1, "s": 1, "d": 1}  # nulls are missing values, not OOV
    assert ds.oov_distinct == {"i": 1, "s": 1, "d": 1}
    # columns in schema.categorical order: i, s, d, flag; vocab index + 1, 0 = OOV/missing
    assert ds.categorical.tolist() == [[3, 2, 3, 2], [0, 0, 2, 0], [0, 0, 0, 1]]
    assert ds.categorical.dtype == torch.int64
    x = by_name(schema)["x"]
    expected = [(1.0 - x.mean) / x.std, 0.0, (8.0 - x.mean) / x.std]
    assert ds.dense[:, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert ds.dense.dtype == torch.float32
    assert ds.labels.tolist() == [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]


def test_no_oov_no_warning(sample_dir, schema):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = data.load(str(sample_dir / "train.parquet"), schema)
    assert ds.oov == {}
    assert (ds.categorical > 0).all()  # every training value is in the vocabulary


def test_dense_standardisation_matches_numpy(sample_dir, schema, train_table):
    ds = data.load(str(sample_dir / "train.parquet"), schema)
    assert ds.dense.shape == (2000, len(schema.dense))
    assert ds.categorical.shape == (2000, len(schema.categorical))
    for k, f in enumerate(schema.dense):
        x = train_table.column(f.name).to_numpy().astype(np.float64)
        expected = (x - x.mean()) / x.std()
        np.testing.assert_allclose(ds.dense[:, k].numpy(), expected, rtol=1e-4, atol=1e-5)
    # after standardisation with the training statistics: mean 0, std 1
    np.testing.assert_allclose(ds.dense.double().mean(0).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(ds.dense.double().std(0, unbiased=False).numpy(), 1.0, atol=1e-5)
    labels = np.stack([train_table.column(t).to_numpy() for t in TASKS], axis=1)
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.float32)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(st.none(), st.integers(-3, 6)), min_size=1, max_size=40))
def test_categorical_encoding_round_trips(tmp_path, values):
    """Encoded index i > 0 always decodes to the original value; 0 exactly for null (no OOV here)."""
    table = pa.table({"c": pa.array(values, type=pa.int64()), "y": pa.array([0] * len(values))})
    path = write(tmp_path / "h.parquet", table)
    schema, _ = infer(path, tasks=["y"], types={"y": "binary"})
    vocab = schema.features[0].vocab
    ds = data.load(str(path), schema)
    for v, idx in zip(values, ds.categorical[:, 0].tolist()):
        assert (idx == 0) == (v is None)
        if v is not None:
            assert vocab[idx - 1] == v


# ---------------------------------------------------------------------------- validation


def assert_names(err, *parts):
    message = str(err.value)
    for p in parts:
        assert str(p) in message, f"{p!r} not in {message!r}"


def test_missing_column(tmp_path, schema, train_table):
    path = write(tmp_path / "m.parquet", train_table.slice(0, 50).drop_columns(["f3"]))
    with pytest.raises(DataError, match="missing column") as err:
        data.load(str(path), schema)
    assert_names(err, path, "f3")


def test_string_column_where_schema_has_dense(tmp_path, schema, train_table):
    t = train_table.slice(0, 50)
    path = write(tmp_path / "w.parquet", replaced(t, "f0", [str(v) for v in t.column("f0").to_pylist()]))
    with pytest.raises(DataError, match="dense") as err:
        data.load(str(path), schema)
    assert_names(err, path, "'f0'")


def test_list_column_where_schema_has_categorical(tmp_path, schema, train_table):
    t = train_table.slice(0, 50)
    path = write(tmp_path / "w.parquet", replaced(t, "device", [["ios"]] * 50))
    with pytest.raises(DataError, match="categorical") as err:
        data.load(str(path), schema)
    assert_names(err, path, "'device'")


def test_numbers_in_a_string_categorical_are_oov(tmp_path, schema, train_table):
    t = train_table.slice(0, 50)
    path = write(tmp_path / "w.parquet", replaced(t, "device", pa.array([1.5] * 50)))
    with pytest.warns(UserWarning, match="device: 50"):
        ds = data.load(str(path), schema)
    k = [f.name for f in schema.categorical].index("device")
    assert (ds.categorical[:, k] == 0).all()


@pytest.mark.parametrize(
    "task, values, words",
    [
        ("click", [2] * 50, "outside {0, 1}"),
        ("click", [-1] + [0] * 49, "outside {0, 1}"),
        ("like", [float("nan")] + [0.0] * 49, "NaN or infinite label"),
        ("like", [float("inf")] + [1.0] * 49, "NaN or infinite label"),
    ],
)
def test_bad_labels(tmp_path, schema, train_table, task, values, words):
    path = write(tmp_path / "l.parquet", replaced(train_table.slice(0, 50), task, values))
    with pytest.raises(DataError) as err:
        data.load(str(path), schema)
    assert_names(err, path, f"'{task}'", words)
    # init refuses the same data
    with pytest.raises(DataError) as err:
        data.infer_schema(str(path), TASKS, BINARY)
    assert_names(err, path, f"'{task}'")


def test_string_label_column(tmp_path, schema, train_table):
    path = write(tmp_path / "l.parquet", replaced(train_table.slice(0, 50), "click", ["yes"] * 50))
    with pytest.raises(DataError) as err:
        data.load(str(path), schema)
    assert_names(err, path, "click")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_dense_feature(tmp_path, schema, train_table, bad):
    t = train_table.slice(0, 50)
    values = t.column("f2").to_pylist()
    values[7] = bad
    path = write(tmp_path / "d.parquet", replaced(t, "f2", values, pa.float32()))
    with pytest.raises(DataError, match="NaN or infinite") as err:
        data.load(str(path), schema)
    assert_names(err, path, "'f2'", "1 NaN")
    with pytest.raises(DataError, match="NaN or infinite"):
        data.infer_schema(str(path), TASKS, BINARY)


def test_null_dense_value_is_the_mean(tmp_path, schema, train_table):
    t = train_table.slice(0, 50)
    values = t.column("f2").to_pylist()
    values[7] = None
    path = write(tmp_path / "d.parquet", replaced(t, "f2", values, pa.float32()))
    ds = data.load(str(path), schema)
    k = [f.name for f in schema.dense].index("f2")
    assert ds.dense[7, k].item() == 0.0
    assert torch.isfinite(ds.dense).all()


def test_empty_dataset(tmp_path, schema, train_table):
    path = write(tmp_path / "e.parquet", train_table.slice(0, 0))
    with pytest.raises(DataError, match="no rows") as err:
        data.load(str(path), schema)
    assert_names(err, path)
    with pytest.raises(DataError, match="no rows"):
        data.infer_schema(str(path), TASKS, BINARY)


def test_empty_file_among_others_is_fine(tmp_path, schema, train_table):
    write(tmp_path / "a.parquet", train_table.slice(0, 0))
    write(tmp_path / "b.parquet", train_table.slice(0, 30))
    ds = data.load(str(tmp_path), schema)
    assert len(ds) == 30
    assert ds.describe(0, 30) == [{"file": str(tmp_path / "b.parquet"), "rows": [0, 30]}]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "corrupt-pages", "empty-file"])
def test_unreadable_parquet(tmp_path, sample_dir, schema, damage):
    raw = (sample_dir / "valid.parquet").read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"this is not parquet\n" * 10
    elif damage == "corrupt-pages":  # footer intact, column data scrambled
        raw = bytearray(raw)
        for i in range(8, len(raw) // 2):
            raw[i] ^= 0xFF
        raw = bytes(raw)
    else:
        raw = b""
    path = tmp_path / "bad.parquet"
    path.write_bytes(raw)
    with pytest.raises(DataError, match="not a readable Parquet file") as err:
        data.load(str(path), schema)
    assert_names(err, path)
    assert "\n" not in str(err.value)
    if damage != "corrupt-pages":  # inference reads the footer first
        with pytest.raises(DataError, match="not a readable Parquet file"):
            data.infer_schema(str(path), TASKS, BINARY)


@pytest.mark.parametrize("problem", ["label", "missing-column", "truncated"])
def test_only_the_second_file_is_bad(tmp_path, schema, train_table, problem):
    good = write(tmp_path / "part-0.parquet", train_table.slice(0, 40))
    bad = tmp_path / "part-1.parquet"
    t = train_table.slice(40, 40)
    if problem == "label":
        write(bad, replaced(t, "like", [3] * 40))
    elif problem == "missing-column":
        write(bad, t.drop_columns(["category"]))
    else:
        write(bad, t)
        bad.write_bytes(bad.read_bytes()[:100])
    for spec in (str(tmp_path), str(tmp_path / "part-*.parquet")):
        with pytest.raises(DataError) as err:
            data.load(spec, schema)
        assert_names(err, bad)
        assert str(good) not in str(err.value)
    with pytest.raises(DataError) as err:
        data.infer_schema(str(tmp_path), TASKS, BINARY)
    assert_names(err, bad)


def test_describe_row_ranges_across_files(tmp_path, schema, train_table):
    a = write(tmp_path / "a.parquet", train_table.slice(0, 300))
    b = write(tmp_path / "b.parquet", train_table.slice(300, 200))
    c = write(tmp_path / "c.parquet", train_table.slice(500, 100))
    ds = data.load(str(tmp_path), schema)
    assert len(ds) == 600
    assert ds.sources == [(str(a), 0, 300), (str(b), 300, 500), (str(c), 500, 600)]
    assert ds.describe(0, 10) == [{"file": str(a), "rows": [0, 10]}]
    assert ds.describe(250, 350) == [{"file": str(a), "rows": [250, 300]}, {"file": str(b), "rows": [0, 50]}]
    assert ds.describe(300, 500) == [{"file": str(b), "rows": [0, 200]}]
    assert ds.describe(290, 600) == [
        {"file": str(a), "rows": [290, 300]},
        {"file": str(b), "rows": [0, 200]},
        {"file": str(c), "rows": [0, 100]},
    ]
    assert ds.describe(600, 700) == []
    # rows come in file order: row 300 of the dataset is row 0 of b.parquet
    whole = data.load(str(tmp_path / "b.parquet"), schema)
    assert torch.equal(ds.labels[300:500], whole.labels)
    assert torch.equal(ds.categorical[300:500], whole.categorical)


def test_batch(sample_dir, schema):
    ds = data.load(str(sample_dir / "valid.parquet"), schema)
    inputs, labels = ds.batch(slice(0, 64))
    assert set(inputs) == {"dense", "categorical"}
    assert inputs["dense"].shape == (64, 6) and inputs["categorical"].shape == (64, 3) and labels.shape == (64, 3)
    assert torch.equal(labels, ds.labels[:64])
