"""Small row groups are coalesced into read units (issue #21, item 11): behaviour, not timing
(the timing is ``python benchmarks/loader.py --row-groups 1,16,256``)."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import data, sample
from cogradctl.errors import DataError
from cogradctl.stream import ParquetStream
from cogradctl.stream import files as files_mod
from cogradctl.stream import parquet as parquet_mod

TASKS = ["click", "like", "share"]
READ = 400  # READ_ROWS for these tests: several coalesced units per file
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "train.parquet"


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """The same 1500 rows twice: as two files of 1-row and 16-row row groups, and as two files of
    one row group each; and the schema. Written once for the module (read-only)."""
    root = tmp_path_factory.mktemp("small")
    a, b = sample.generate(700, seed=21), sample.generate(800, seed=22)
    for name, rg in (("tiny", (1, 16)), ("whole", (700, 800))):
        (root / name).mkdir()
        pq.write_table(a, root / name / "a.parquet", row_group_size=rg[0])
        pq.write_table(b, root / name / "b.parquet", row_group_size=rg[1])
    schema = data.infer_schema(str(root / "whole"), TASKS, {t: "binary" for t in TASKS})[0]
    return root / "tiny", root / "whole", schema


@pytest.fixture
def small(small_files, monkeypatch):
    """``small_files``, read with READ_ROWS = READ."""
    monkeypatch.setattr(files_mod, "READ_ROWS", READ)
    return small_files


def rowset(batches) -> list[tuple]:
    rows = []
    for inputs, labels in batches:
        rows += torch.cat([inputs["dense"].double(), inputs["categorical"].double(), labels.double()], 1).tolist()
    return sorted(map(tuple, rows))


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[1], y[1]) and all(torch.equal(x[0][k], y[0][k]) for k in x[0]) for x, y in zip(a, b)
    )


def test_small_groups_are_coalesced_per_file_up_to_read_rows(small):
    tiny, _, schema = small
    s = ParquetStream(str(tiny), schema)
    assert [(u.file, u.rows) for u in s.units] == [(0, 400), (0, 300), (1, 400), (1, 400)]
    assert [u.start for u in s.units] == [0, 400, 700, 1100]
    assert s.units[0].row_groups == list(range(400)) and s.units[3].row_groups == list(range(25, 50))


def test_every_row_once_as_with_one_row_group(small):
    tiny, whole, schema = small
    s, w = ParquetStream(str(tiny), schema, shuffle_buffer=300), ParquetStream(str(whole), schema, shuffle_buffer=300)
    expected = rowset(w.batches(64, shuffle=False))
    assert len(expected) == len(set(expected)) == 1500
    assert rowset(s.batches(64, shuffle=False)) == expected
    assert same(list(s.batches(64, shuffle=False)), list(w.batches(64, shuffle=False)))  # the global order
    for epoch in range(3):
        epoch_batches = list(s.batches(64, shuffle=True, seed=5, epoch=epoch))
        assert rowset(epoch_batches) == expected
        assert same(epoch_batches, list(s.batches(64, shuffle=True, seed=5, epoch=epoch)))
    assert not same(list(s.batches(64, shuffle=True, seed=5)), list(s.batches(64, shuffle=True, seed=6)))


@pytest.mark.parametrize("shards", [2, 3, 5])
def test_shards_disjoint_and_covering(small, shards):
    tiny, _, schema = small
    s = ParquetStream(str(tiny), schema, shuffle_buffer=200)
    every = rowset(s.batches(64, shuffle=True, seed=3, epoch=1))
    per = [rowset(s.batches(64, shuffle=True, seed=3, epoch=1, shards=shards, take=(k,))) for k in range(shards)]
    assert max(map(len, per)) - min(map(len, per)) <= 1
    assert sorted(r for p in per for r in p) == every and len(set(every)) == 1500


@pytest.mark.parametrize("shards", [1, 2])
def test_resume_is_the_uninterrupted_tail(small, shards):
    tiny, _, schema = small
    s = ParquetStream(str(tiny), schema, shuffle_buffer=150)
    take = tuple(range(shards))
    full = list(s.batches(50, shuffle=True, seed=1, epoch=2, shards=shards, take=take))
    for start in (1, 7, len(full) - 1):
        tail = list(s.batches(50, shuffle=True, seed=1, epoch=2, shards=shards, take=take, start_batch=start))
        assert same(full[start:], tail), start


def test_read_calls_are_bounded(small, monkeypatch):
    tiny, _, schema = small
    calls = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    s = ParquetStream(str(tiny), schema)
    assert sum(len(y) for _, y in s.batches(64, shuffle=True, seed=0)) == 1500
    assert len(calls) <= 1500 // READ + 2  # rows / READ_ROWS + files, not one per row group (750)


def file_rows(d) -> list[tuple[str, int]]:
    return [(Path(p).name, off + k) for (p, a, b), off in zip(d.sources, d.offsets) for k in range(b - a)]


def test_global_rows_and_describe_unchanged(small):
    tiny, whole, schema = small
    s, w = ParquetStream(str(tiny), schema), ParquetStream(str(whole), schema)
    for ranges in ([(0, 1500)], [(3, 5), (390, 410), (699, 702), (1490, 1600)]):
        a, b = s.rows(ranges), w.rows(ranges)
        assert torch.equal(a.dense, b.dense) and torch.equal(a.labels, b.labels)
        assert file_rows(a) == file_rows(b)  # each row's (file, row in the file)
    assert [d["rows"] for d in s.describe(650, 800)] == [[650, 700], [0, 100]]


def test_invalid_row_names_the_range_of_row_groups(tmp_path, small):
    _, _, schema = small
    table = sample.generate(500, seed=9)
    f0 = table.column("f0").to_pylist()
    f0[450] = float("nan")
    table = table.set_column(table.schema.get_field_index("f0"), "f0", [f0])
    pq.write_table(table, tmp_path / "nan.parquet", row_group_size=1)
    with pytest.raises(DataError, match=r"nan\.parquet \(row groups 400-499\): 1 invalid row"):
        list(ParquetStream(str(tmp_path / "nan.parquet"), schema).batches(64, shuffle=True))
    s = ParquetStream(str(tmp_path / "nan.parquet"), schema, on_invalid="drop")
    assert sum(len(y) for _, y in s.batches(64, shuffle=True)) == 499 and s.stats["rows_dropped"] == 1


def test_large_row_groups_are_bit_identical(tmp_path, monkeypatch):
    """Files whose row groups are all SMALL_GROUP rows or more (the sample data, 4096-row groups)
    and a small group alone between large ones stream exactly as without coalescing."""
    table = sample.generate(1000, seed=4)
    pq.write_table(table.slice(0, 600), tmp_path / "a.parquet", row_group_size=300)
    pq.write_table(table.slice(600), tmp_path / "b.parquet", row_group_size=256)  # 256 + 144
    schema = data.infer_schema(str(SAMPLE), TASKS, {t: "binary" for t in TASKS})[0]
    for spec, buffer in ((str(SAMPLE), 65536), (str(SAMPLE), 1000), (str(tmp_path), 200)):
        runs = []
        for merge in (True, False):
            if not merge:
                monkeypatch.setattr(parquet_mod, "coalesce", lambda units: units)
            s = ParquetStream(spec, schema, shuffle_buffer=buffer)
            runs.append(
                [
                    list(s.batches(256, shuffle=True, seed=7, epoch=e, shards=sh, take=(0,)))
                    for e in (0, 1)
                    for sh in (1, 3)
                ]
            )
            monkeypatch.undo()
        assert all(same(x, y) for x, y in zip(*runs)), spec


@pytest.fixture(scope="module")
def with_nans(tmp_path_factory):
    """900 rows in 1-row row groups, f0 NaN in rows 5, 450, 451 and 899 (read-only)."""
    table = sample.generate(900, seed=3)
    f0 = table.column("f0").to_pylist()
    for i in (5, 450, 451, 899):
        f0[i] = float("nan")
    table = table.set_column(table.schema.get_field_index("f0"), "f0", [f0])
    path = tmp_path_factory.mktemp("nans") / "x.parquet"
    pq.write_table(table, path, row_group_size=1)
    return path


@pytest.mark.parametrize("shards", [1, 2])
def test_resume_with_dropped_rows(with_nans, small, shards):
    """With --on-invalid-rows drop, skipping reads coalesced units for their valid rows' ids."""
    _, _, schema = small
    s = ParquetStream(str(with_nans), schema, on_invalid="drop", shuffle_buffer=100)
    take = tuple(range(shards))
    full = list(s.batches(32, shuffle=True, seed=2, shards=shards, take=take))
    assert sum(len(y) for _, y in full) == 896
    for start in (1, 10, len(full) - 1):
        tail = list(s.batches(32, shuffle=True, seed=2, shards=shards, take=take, start_batch=start))
        assert same(full[start:], tail), start
