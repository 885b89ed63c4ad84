"""ParquetStream: same encoding as data.load, deterministic shuffle, exact resume, hive partitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import data, sample
from cogradctl.errors import DataError, UsageError
from cogradctl.labels import LabelOptions
from cogradctl.stream import ParquetStream

TASKS = ["click", "like", "share"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three files of 700, 0 and 1100 rows in small row groups (a directory), and the schema."""
    root = tmp_path_factory.mktemp("parts")
    pq.write_table(sample.generate(700, seed=5), root / "a.parquet", row_group_size=256)
    pq.write_table(sample.generate(0, seed=6), root / "b.parquet")
    pq.write_table(sample.generate(1100, seed=7), root / "c.parquet", row_group_size=300)
    schema, _ = data.infer_schema(str(root), TASKS, {t: "binary" for t in TASKS})
    return root, schema


def cat(batches):
    return (
        torch.cat([b[0]["dense"] for b in batches]),
        torch.cat([b[0]["categorical"] for b in batches]),
        torch.cat([b[1] for b in batches]),
    )


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x[0]["dense"], y[0]["dense"])
        and torch.equal(x[0]["categorical"], y[0]["categorical"])
        and torch.equal(x[1], y[1])
        for x, y in zip(a, b)
    )


def test_in_order_stream_equals_load(parts):
    root, schema = parts
    ds = data.load(str(root), schema)
    s = ParquetStream(str(root), schema)
    assert s.num_rows == len(ds) == 1800
    batches = list(s.batches(512, shuffle=False))
    assert [len(b[1]) for b in batches] == [512, 512, 512, 264]
    d, c, y = cat(batches)
    assert torch.equal(d, ds.dense) and torch.equal(c, ds.categorical) and torch.equal(y, ds.labels)
    assert batches[0][0]["dense"].dtype == torch.float32 and batches[0][0]["categorical"].dtype == torch.int64


@pytest.mark.parametrize("buffer", [0, 100, 5000])
def test_shuffle_is_a_deterministic_permutation(parts, buffer):
    root, schema = parts
    ds = data.load(str(root), schema)
    s = ParquetStream(str(root), schema, shuffle_buffer=buffer)
    a = list(s.batches(128, shuffle=True, seed=1, epoch=0))
    assert same(
        a, list(ParquetStream(str(root), schema, shuffle_buffer=buffer).batches(128, shuffle=True, seed=1, epoch=0))
    )
    d, _, y = cat(a)
    key = lambda m: sorted(map(tuple, m.tolist()))  # noqa: E731
    assert key(torch.cat([d, y], 1)) == key(torch.cat([ds.dense, ds.labels], 1))
    assert not torch.equal(d, ds.dense)
    assert not same(a, list(s.batches(128, shuffle=True, seed=1, epoch=1)))
    assert not same(a, list(s.batches(128, shuffle=True, seed=2, epoch=0)))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("on_invalid", ["error", "drop"])
def test_start_batch_resumes_exactly(parts, shuffle, on_invalid):
    root, schema = parts
    s = ParquetStream(str(root), schema, shuffle_buffer=400, on_invalid=on_invalid)
    full = list(s.batches(97, shuffle=shuffle, seed=4, epoch=3))
    assert len(full) == 19
    for start in (1, 3, 6, 17, 18, 19, 25):
        assert same(full[start:], list(s.batches(97, shuffle=shuffle, seed=4, epoch=3, start_batch=start))), start


def test_start_batch_does_not_encode_skipped_rows(parts, monkeypatch):
    root, schema = parts
    s = ParquetStream(str(root), schema, shuffle_buffer=200)
    list(s.batches(100, shuffle=True, start_batch=0))
    full_reads = s.stats["rows_read"]
    s.stats["rows_read"] = 0
    list(s.batches(100, shuffle=True, start_batch=15))
    assert s.stats["rows_read"] < full_reads / 2


def test_rows_and_describe(parts):
    root, schema = parts
    ds = data.load(str(root), schema)
    s = ParquetStream(str(root), schema)
    sub = s.rows([(650, 760), (1790, 1800)])
    assert len(sub) == 120
    assert torch.equal(sub.dense[:110], ds.dense[650:760]) and torch.equal(sub.labels[110:], ds.labels[1790:])
    assert s.describe(650, 760) == ds.describe(650, 760)
    assert sub.describe(0, 110) == ds.describe(650, 760)
    assert sub.describe(110, 120) == [{"file": str(root / "c.parquet"), "rows": [1090, 1100]}]


def test_hive_partitions_and_directory_globs(tmp_path):
    for day, seed in (("2026-11-01", 1), ("2026-11-02", 2), ("2026-12-01", 3)):
        d = tmp_path / "events" / f"date={day}" / "hour=7"
        d.mkdir(parents=True)
        pq.write_table(sample.generate(50, seed=seed).drop_columns(["device"]), d / "part-0.parquet")
    # 'hour' is a partition key, not a column; use it as a categorical feature
    table = sample.generate(50, seed=1).drop_columns(["device"]).append_column("hour", pa.array([7] * 50))
    pq.write_table(table, tmp_path / "like.parquet")
    schema, _ = data.infer_schema(str(tmp_path / "like.parquet"), TASKS, {t: "binary" for t in TASKS})
    s = ParquetStream(f"{tmp_path}/events/date=2026-11-*", schema)
    assert s.num_rows == 100 and len(s.files) == 2
    _, c, _ = cat(list(s.batches(64, shuffle=False)))
    hour = [f.name for f in schema.categorical].index("hour")
    assert (c[:, hour] == 1).all()  # 7 is in the vocabulary: index 1


def test_drop_invalid_rows_counts_them(tmp_path, parts):
    _, schema = parts
    table = sample.generate(300, seed=9)
    f0 = table.column("f0").to_numpy().copy()
    f0[[3, 200]] = [np.nan, np.inf]
    like = table.column("like").to_pylist()
    like[10] = None
    table = table.set_column(0, "f0", pa.array(f0)).set_column(
        table.schema.get_field_index("like"), "like", pa.array(like, pa.int8())
    )
    pq.write_table(table, tmp_path / "bad.parquet")
    strict = LabelOptions(missing="error")  # a null label makes its row invalid, as before --missing-labels
    with pytest.raises(
        DataError, match=r"bad.parquet \(row group 0\): 3 invalid row\(s\).*'f0' 2.*'like' 1.*--on-invalid-rows drop"
    ):
        list(ParquetStream(str(tmp_path / "bad.parquet"), schema, label_options=strict).batches(64, shuffle=False))
    s = ParquetStream(str(tmp_path / "bad.parquet"), schema, on_invalid="drop", label_options=strict)
    _, _, y = cat(list(s.batches(64, shuffle=False)))
    assert len(y) == 297 and s.stats["rows_dropped"] == 3
    # --missing-labels mask (the default): the null label is NaN in its row, which is kept
    with pytest.raises(DataError, match=r"2 invalid row\(s\) \(NaN or infinite values: column 'f0' 2\)"):
        list(ParquetStream(str(tmp_path / "bad.parquet"), schema).batches(64, shuffle=False))
    s = ParquetStream(str(tmp_path / "bad.parquet"), schema, on_invalid="drop")
    _, _, y = cat(list(s.batches(64, shuffle=False)))
    assert len(y) == 298 and s.stats["rows_dropped"] == 2 and s.stats["labels_masked"] == {"like": 1}
    like_k = schema.task_names.index("like")
    assert int(torch.isnan(y).sum()) == 1 and bool(torch.isnan(y[10 - 1, like_k]))  # row 3 before it was dropped


def test_bad_arguments(parts):
    root, schema = parts
    with pytest.raises(UsageError, match="--on-invalid-rows"):
        ParquetStream(str(root), schema, on_invalid="ignore")
    with pytest.raises(UsageError, match="--shuffle-buffer"):
        ParquetStream(str(root), schema, shuffle_buffer=-1)


def _rowset(batches) -> list[tuple]:
    dense, cats, labels = cat(batches)
    return sorted(map(tuple, torch.cat([dense, cats.double(), labels.double()], dim=1).tolist()))


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_data_shards_partition_the_epoch(parts, shards):
    """Shards are disjoint, cover every row once, are equal to ±1 row (row groups cut where
    needed), and a process holding several shards sees the concatenation of their batches."""
    root, schema = parts
    s = ParquetStream(str(root), schema, shuffle_buffer=200)
    every = _rowset(list(s.batches(64, shuffle=True, seed=3, epoch=2)))
    per = [list(s.batches(64, shuffle=True, seed=3, epoch=2, shards=shards, take=(k,))) for k in range(shards)]
    sizes = [sum(len(b[1]) for b in p) for p in per]
    assert sum(sizes) == 1800 and max(sizes) - min(sizes) <= 1
    assert sorted(r for p in per for r in _rowset(p)) == every
    together = list(s.batches(64, shuffle=True, seed=3, epoch=2, shards=shards, take=tuple(range(shards))))
    for t, batch in enumerate(together):
        alone = [p[t] for p in per if t < len(p)]
        assert torch.equal(batch[1], torch.cat([b[1] for b in alone]))
        assert torch.equal(batch[0]["dense"], torch.cat([b[0]["dense"] for b in alone]))
    # Deterministic per (seed, epoch, shards); another seed reorders.
    assert same(per[1], list(s.batches(64, shuffle=True, seed=3, epoch=2, shards=shards, take=(1,))))
    assert not same(per[1], list(s.batches(64, shuffle=True, seed=4, epoch=2, shards=shards, take=(1,))))


def test_data_shards_resume_exactly(parts):
    root, schema = parts
    s = ParquetStream(str(root), schema, shuffle_buffer=150)
    full = list(s.batches(50, shuffle=True, seed=1, epoch=1, shards=2, take=(0, 1)))
    for start in (1, 5, len(full) - 1):
        assert same(
            full[start:], list(s.batches(50, shuffle=True, seed=1, epoch=1, shards=2, take=(0, 1), start_batch=start))
        ), start


def test_data_shard_numbers_are_checked(parts):
    root, schema = parts
    with pytest.raises(UsageError, match="data shards"):
        next(ParquetStream(str(root), schema).batches(10, shuffle=True, shards=2, take=(2,)))


def test_no_rows_left_is_an_error_for_a_process_holding_every_shard(tmp_path, parts):
    _, schema = parts
    table = sample.generate(300, seed=3)
    table = table.set_column(table.schema.get_field_index("f0"), "f0", pa.array([np.nan] * 300, pa.float64()))
    pq.write_table(table, tmp_path / "bad.parquet", row_group_size=100)
    s = ParquetStream(str(tmp_path / "bad.parquet"), schema, on_invalid="drop")
    for shards, take in ((1, (0,)), (2, (0, 1))):
        with pytest.raises(DataError, match="no rows left after dropping"):
            list(s.batches(32, shuffle=True, shards=shards, take=take))
    # One shard of two may be empty: the other process may still hold rows.
    assert list(s.batches(32, shuffle=True, shards=2, take=(1,))) == []


def unseen_table(root, seed: int = 0):
    """60 rows of ``root``'s data with unseen values: device 'fridge' ×7 and 'toaster' ×3 (strings, read
    dictionary-encoded), user_bucket ids far outside the vocabulary ×5 (3 distinct, nulls beside)."""
    t = pq.read_table(root / "a.parquet").slice(60 * seed, 60)
    device = t.column("device").to_pylist()
    device[:10] = ["fridge"] * 7 + ["toaster"] * 3
    users = t.column("user_bucket").to_pylist()
    users[20:27] = [10**9, 10**9, 10**9 + 1, 10**9 + 1, 10**9 + 2, None, None]
    t = t.set_column(t.schema.get_field_index("device"), "device", pa.array(device))
    return t.set_column(t.schema.get_field_index("user_bucket"), "user_bucket", pa.array(users, pa.int64()))


@pytest.mark.parametrize("wide", [False, True], ids=["lookup-table", "index-in"])
def test_unseen_values_counted_in_rows_and_distinct_values(parts, tmp_path, wide, monkeypatch):
    """Rows and distinct values not in the vocabulary, per column, the same in the stream (both ways of
    encoding integers) and in data.load; the warning says both (issue #25 item 14)."""
    from cogradctl import encodings

    if wide:
        monkeypatch.setattr(encodings, "LUT_SPAN", 0)  # integers through index_in, not the lookup table
    root, schema = parts
    pq.write_table(unseen_table(root), tmp_path / "a.parquet", row_group_size=16)
    pq.write_table(unseen_table(root, seed=1), tmp_path / "b.parquet")  # the same unseen values again
    s = ParquetStream(str(tmp_path), schema)
    for _ in s.batches(32, shuffle=True):
        pass
    assert s.stats["oov"] == {"device": 20, "user_bucket": 10}
    assert s.stats["oov_distinct"] == {"device": 2, "user_bucket": 3} and s.stats["oov_distinct_capped"] == []
    message = s.unseen_warning()
    assert message == (
        f"{tmp_path}: categorical values without a row of their own (not in the vocabulary, or outside the "
        "encoding's range) were mapped to their column's out-of-vocabulary row: device: 20 rows, 2 distinct values; user_bucket: 10 rows, 3 distinct values"
    )
    with pytest.warns(UserWarning) as caught:
        ds = data.load(str(tmp_path), schema)
    assert ds.oov == s.stats["oov"] and ds.oov_distinct == s.stats["oov_distinct"]
    assert str(caught[0].message) == message
    assert s.rows([(0, 120)]).oov_distinct == {"device": 2, "user_bucket": 3}


def test_distinct_unseen_values_are_remembered_up_to_a_cap(parts, tmp_path, monkeypatch):
    from cogradctl.stream import encode

    monkeypatch.setattr(encode, "DISTINCT_CAP", 2)
    root, schema = parts
    pq.write_table(unseen_table(root), tmp_path / "a.parquet", row_group_size=16)
    s = ParquetStream(str(tmp_path), schema)
    list(s.batches(64, shuffle=False))
    assert s.stats["oov_distinct"] == {"device": 2, "user_bucket": 2}
    assert s.stats["oov_distinct_capped"] == ["user_bucket"]
    assert "user_bucket: 5 rows, at least 2 distinct values" in s.unseen_warning()
    assert "device: 10 rows, 2 distinct values" in s.unseen_warning()


def test_no_unseen_values_no_warning(parts):
    root, schema = parts
    s = ParquetStream(str(root), schema)
    list(s.batches(512, shuffle=False))
    assert s.stats["oov"] == {} and s.stats["oov_distinct"] == {} and s.unseen_warning() is None
