"""Data edge cases of issue #21 item 9, through the CLI: exit 2, one line naming the file and the
column and what was expected, nothing written. The decisions each test pins down:

* a duplicate column name: refused in every command, naming the file and the column, whichever
  columns the command reads (which of the two a name means is ambiguous);
* a column stored as a different kind of value in two files: refused at ``init`` naming both files
  and both types. Widths and encodings of the same kind are compatible (int32 / int64, float32 /
  float64, string / dictionary of strings; for dense features and labels any number); numbers vs
  strings are not, so numeric strings in one file and numbers in another are refused too;
* a uint64 categorical value beyond int64: refused naming file and column (the vocabulary is int64);
* a broken symbolic link (or any entry that is not a regular file) among the files ``--data`` names:
  refused naming it, in every command, never skipped;
* vocabularies too large for the checkpoint's safetensors header (100 MB; the schema may use
  ``infer.SCHEMA_HEADER_BUDGET`` of it): refused at ``init`` naming the column with the largest
  vocabulary and its longest value's length (issue #23 will move vocabularies into tensors).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli_errors import assert_input_error  # tests/ is on sys.path (rootdir conftest)

from cogradctl import data as data_io
from cogradctl import infer

N = 64


def columns(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return {"f1": rng.normal(size=n), "c1": rng.integers(0, 5, n), "click": rng.integers(0, 2, n)}


def write(cols, path, names=None):
    table = pa.Table.from_arrays([pa.array(v) for v in cols.values()], names=names or list(cols))
    pq.write_table(table, path)
    return path


def init(cli, data, out):
    return cli("init", "--model", "mmoe", "--data", data, "--tasks", "click", "--out", out, "--quiet")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cli):
    root = tmp_path_factory.mktemp("edge")
    data = write(columns(), root / "good.parquet")
    out = root / "m.safetensors"
    assert init(cli, data, out).exit_code == 0
    return out


def readers(ckpt, data, tmp):
    return {
        "evaluate": ("evaluate", "--checkpoint", ckpt, "--data", data),
        "predict": ("predict", "--checkpoint", ckpt, "--data", data, "--out", tmp / "p.parquet"),
        "train": ("train", "--checkpoint", ckpt, "--data", data, "--out", tmp / "run", "--max-steps", "1", "--quiet"),
        "init": ("init", "--model", "mmoe", "--data", data, "--tasks", "click", "--out", tmp / "i.safetensors"),
    }


def assert_refused_everywhere(cli, ckpt, data, tmp, *needles):
    for name, args in readers(ckpt, data, tmp).items():
        before = sorted(p.name for p in tmp.iterdir())
        result = cli(*args)
        assert_input_error(result, *needles)
        assert sorted(p.name for p in tmp.iterdir()) == before, name


def test_duplicate_column_refused_in_every_command(cli, tmp_path, checkpoint):
    cols = columns()
    data = write({**cols, "f1b": cols["f1"]}, tmp_path / "dup.parquet", names=["f1", "c1", "click", "f1"])
    assert_refused_everywhere(cli, checkpoint, data, tmp_path, "dup.parquet", "'f1'", "unique")


def test_broken_symlink_in_directory_refused_in_every_command(cli, tmp_path, checkpoint):
    d = tmp_path / "data"
    d.mkdir()
    write(columns(), d / "a.parquet")
    os.symlink(tmp_path / "gone.parquet", d / "b.parquet")
    assert_refused_everywhere(cli, checkpoint, d, tmp_path, "b.parquet", "broken symbolic link")
    # through a glob as well
    assert_input_error(cli(*readers(checkpoint, f"{d}/*.parquet", tmp_path)["evaluate"]), "b.parquet")


def test_directory_named_parquet_contributes_its_files(tmp_path):
    (tmp_path / "out.parquet").mkdir()
    write(columns(), tmp_path / "out.parquet" / "part-0.parquet")
    assert data_io.resolve(str(tmp_path)) == [tmp_path / "out.parquet" / "part-0.parquet"]


@pytest.mark.parametrize(
    "column, value, kind",
    [
        ("c1", lambda v: [str(x) for x in v], "string"),  # numeric strings vs integers
        ("f1", lambda v: [str(x) for x in v], "string"),  # numeric strings vs floats
        ("c1", lambda v: v.astype(float), "double"),  # floats vs integers (categorical)
    ],
)
def test_type_differs_between_files_refused_at_init(cli, tmp_path, column, value, kind):
    d = tmp_path / "data"
    d.mkdir()
    write(columns(), d / "a.parquet")
    cols = columns(1)
    write({**cols, column: value(cols[column])}, d / "b.parquet")
    result = init(cli, d, tmp_path / "m.safetensors")
    assert_input_error(result, "b.parquet", "a.parquet", f"'{column}'", kind)
    assert not (tmp_path / "m.safetensors").exists()


def test_compatible_widths_across_files_accepted(cli, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(columns(), d / "a.parquet")
    cols = columns(1)
    cols = {
        "f1": cols["f1"].astype(np.float32),
        "c1": pa.array(cols["c1"].astype(np.int32)).dictionary_encode(),
        "click": cols["click"].astype(bool),
    }
    write(cols, d / "b.parquet")
    assert init(cli, d, tmp_path / "m.safetensors").exit_code == 0


def test_uint64_beyond_int64_refused_at_init(cli, tmp_path):
    cols = columns()
    cols["c1"] = np.full(N, 2**63 + 5, dtype=np.uint64)
    data = write(cols, tmp_path / "u64.parquet")
    result = init(cli, data, tmp_path / "m.safetensors")
    assert_input_error(result, "u64.parquet", "'c1'", "uint64")
    assert not (tmp_path / "m.safetensors").exists()


def test_vocabulary_too_large_for_the_header_refused_at_init(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(infer, "SCHEMA_HEADER_BUDGET", 20_000)
    cols = columns()
    cols["c1"] = [f"{i:03d}" + "x" * 997 for i in range(N)]
    data = write(cols, tmp_path / "long.parquet")
    result = init(cli, data, tmp_path / "m.safetensors")
    assert_input_error(result, "long.parquet", "'c1'", "1000 characters", "100 MB", "--max-vocab")
    assert not (tmp_path / "m.safetensors").exists()


def test_categorical_of_another_kind_than_the_vocabulary_refused_by_readers(cli, tmp_path, checkpoint):
    """The checkpoint's vocabulary of c1 holds integers: a file storing c1 as (numeric) strings is
    refused by the footer check every reading command makes, not cast to match by accident."""
    cols = columns(1)
    data = write({**cols, "c1": [f"00{x}" for x in cols["c1"]]}, tmp_path / "strs.parquet")
    for name, args in readers(checkpoint, data, tmp_path).items():
        if name != "init":
            assert_input_error(cli(*args), "strs.parquet", "'c1'", "integers")


@pytest.mark.parametrize("column", ["click", "f1"])
def test_integers_beyond_float64_refused_at_init(cli, tmp_path, column):
    """Labels and dense features are read as float64: integers beyond ±2**53 are refused naming the
    file and column (as the stream does), not an ArrowInvalid exiting 1."""
    cols = columns()
    cols[column] = np.full(N, 2**60 + 1, dtype=np.int64)
    data = write(cols, tmp_path / "big.parquet")
    args = ["--task-type", "click=regression"] + (["--dense", "f1"] if column == "f1" else [])
    result = cli(*init_args(data, tmp_path / "m.safetensors"), *args)
    assert_input_error(result, "big.parquet", f"'{column}'", "numbers")


def init_args(data, out):
    return ("init", "--model", "mmoe", "--data", data, "--tasks", "click", "--out", out, "--quiet")
