"""The bad-input table (docs/data.md) through the CLI: one clear line, exit 2, nothing written, input untouched.

Rows already covered elsewhere are not repeated here: missing path / empty directory / glob matching
nothing, binary labels outside {0, 1}, a missing column (tests/test_cli_errors.py), plain
safetensors without metadata, unknown method / model / option (tests/test_cli_errors.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli_errors import assert_input_error, state  # tests/ is on sys.path (rootdir conftest)

READERS = {
    "evaluate": lambda c, d, tmp: ("evaluate", "--checkpoint", c, "--data", d),
    "measure-transference": lambda c, d, tmp: (
        "measure-transference",
        "--checkpoint",
        c,
        "--data",
        d,
        "--batches",
        "1",
        "--batch-size",
        "64",
        "--raw",
        tmp / "raw.parquet",
    ),
}


@pytest.fixture(scope="module")
def valid_table(sample_dir):
    return pq.read_table(sample_dir / "valid.parquet")


def write(table, path):
    pq.write_table(table, path)
    return path


def run_untouched(cli, tmp_path, args, *inputs):
    """Run, and check that every input is byte-for-byte unchanged and nothing new was written."""
    before = {p: state(p) for p in inputs}
    listing = sorted(p.name for p in tmp_path.iterdir())
    result = cli(*args)
    assert {p: state(p) for p in inputs} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    return result


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("damage", ["truncated", "flipped-magic", "random-bytes"])
def test_corrupt_parquet(cli, tmp_path, base_checkpoint, sample_dir, command, damage):
    raw = (sample_dir / "valid.parquet").read_bytes()
    bad = tmp_path / "bad.parquet"
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped-magic":
        bad.write_bytes(raw[:-4] + b"XXXX")
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(5000))
    r = run_untouched(cli, tmp_path, READERS[command](base_checkpoint, bad, tmp_path), bad, base_checkpoint)
    assert_input_error(r, bad, "not a readable Parquet file")


def test_corrupt_data_page_names_the_row_group(cli, tmp_path, base_checkpoint, valid_table):
    """A readable footer but damaged column data: the error names the file and the row group."""
    path = tmp_path / "pages.parquet"
    pq.write_table(valid_table, path, compression="none", row_group_size=100)
    raw = bytearray(path.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little")
    rng = np.random.default_rng(1)
    for i in rng.choice(np.arange(8, len(raw) - footer - 8), 3000, replace=False):
        raw[i] = rng.integers(0, 256)
    path.write_bytes(bytes(raw))
    r = run_untouched(cli, tmp_path, ("evaluate", "--checkpoint", base_checkpoint, "--data", path), path)
    if r.exit_code != 0:  # byte flips inside values may decode fine; structural damage must be one line
        assert_input_error(r, path)


@pytest.mark.parametrize("command", READERS)
def test_truncated_safetensors(cli, tmp_path, base_checkpoint, sample_dir, command):
    bad = tmp_path / "cut.safetensors"
    raw = base_checkpoint.read_bytes()
    bad.write_bytes(raw[: len(raw) - 100])
    r = run_untouched(cli, tmp_path, READERS[command](bad, sample_dir / "valid.parquet", tmp_path), bad)
    assert_input_error(r, bad, "safetensors")


def test_safetensors_without_metadata_says_what_is_missing(cli, tmp_path, sample_dir):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain, metadata={"format": "cogradctl-checkpoint"})
    r = run_untouched(cli, tmp_path, READERS["evaluate"](plain, sample_dir / "valid.parquet", tmp_path), plain)
    assert_input_error(r, plain, "missing: format_version, model, model_config, schema", "cogradctl init")


@pytest.mark.parametrize("command", READERS)
def test_checkpoint_tensors_that_do_not_fit_the_plugin(cli, tmp_path, base_checkpoint, sample_dir, command):
    from safetensors import safe_open

    with safe_open(base_checkpoint, "pt") as f:
        meta = f.metadata()
    tensors = load_file(base_checkpoint)
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    tensors.pop(next(k for k in tensors if k != name))
    bad = tmp_path / "misfit.safetensors"
    save_file(tensors, bad, metadata=meta)
    r = run_untouched(cli, tmp_path, READERS[command](bad, sample_dir / "valid.parquet", tmp_path), bad)
    assert_input_error(r, bad, "do not fit the model plugin", name[len("model.") :], "missing")


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize(
    "column, values, words",
    [
        ("f2", pa.array(["x"] * 500), ["'f2' is string", "numeric dense feature"]),
        ("category", pa.array([[1]] * 500), ["'category' is list", "categorical feature"]),
        ("click", pa.array(["1"] * 500), ["task column 'click' is string", "numeric or boolean"]),
    ],
)
def test_column_of_the_wrong_type(cli, tmp_path, base_checkpoint, valid_table, command, column, values, words):
    path = write(
        valid_table.set_column(valid_table.schema.get_field_index(column), column, values), tmp_path / "typed.parquet"
    )
    r = run_untouched(cli, tmp_path, READERS[command](base_checkpoint, path, tmp_path), path, base_checkpoint)
    assert_input_error(r, path, *words)


def nan_table(valid_table):
    f1 = valid_table.column("f1").to_numpy().copy()
    f1[[0, 5]] = [np.nan, -np.inf]
    share = valid_table.column("share").cast(pa.float32()).to_numpy().copy()
    share[9] = np.nan
    t = valid_table.set_column(valid_table.schema.get_field_index("f1"), "f1", pa.array(f1))
    return t.set_column(t.schema.get_field_index("share"), "share", pa.array(share))


@pytest.mark.parametrize("command", READERS)
def test_nan_and_inf_rows_are_an_error_with_a_count(cli, tmp_path, base_checkpoint, valid_table, command):
    path = write(nan_table(valid_table), tmp_path / "nan.parquet")
    r = run_untouched(
        cli,
        tmp_path,
        (*READERS[command](base_checkpoint, path, tmp_path)[:-2], "--batch-size", "500")
        if command != "evaluate"
        else READERS[command](base_checkpoint, path, tmp_path),
        path,
    )
    assert_input_error(r, path, "row group 0", "3 invalid row(s)", "'f1' 2", "'share' 1", "--on-invalid-rows drop")


def test_drop_invalid_rows_logs_the_count(cli, tmp_path, base_checkpoint, valid_table):
    path = write(nan_table(valid_table), tmp_path / "nan.parquet")
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", path, "--on-invalid-rows", "drop", "--json")
    assert r.exit_code == 0, r.output
    import json

    assert json.loads(r.stdout)["rows"] == 497
    assert "dropped 3 invalid row(s)" in r.stderr
    r = cli(
        "measure-transference",
        "--checkpoint",
        base_checkpoint,
        "--data",
        path,
        "--on-invalid-rows",
        "drop",
        "--batches",
        "1",
        "--batch-size",
        "500",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert "dropped 3 invalid row(s)" in r.stderr


@pytest.mark.parametrize("command", READERS)
def test_empty_after_dropping(cli, tmp_path, base_checkpoint, valid_table, command):
    t = valid_table.slice(0, 40)
    path = write(t.set_column(0, "f0", pa.array([np.nan] * 40, pa.float32())), tmp_path / "allbad.parquet")
    args = (*READERS[command](base_checkpoint, path, tmp_path), "--on-invalid-rows", "drop")
    r = run_untouched(cli, tmp_path, args, path)
    assert_input_error(r, path, "no rows left after dropping 40 invalid row(s)")


@pytest.mark.parametrize("command", READERS)
def test_bad_on_invalid_rows_value(cli, tmp_path, base_checkpoint, sample_dir, command):
    r = run_untouched(
        cli,
        tmp_path,
        (*READERS[command](base_checkpoint, sample_dir / "valid.parquet", tmp_path), "--on-invalid-rows", "skip"),
    )
    assert_input_error(r, "--on-invalid-rows 'skip'", "error, drop")


def test_unseen_categories_are_counted_and_warned(cli, tmp_path, base_checkpoint, valid_table):
    device = valid_table.column("device").to_pylist()
    device[:7] = ["fridge"] * 7
    path = write(
        valid_table.set_column(valid_table.schema.get_field_index("device"), "device", pa.array(device)),
        tmp_path / "oov.parquet",
    )
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", path, "--json")
    assert r.exit_code == 0, r.output
    assert "mapped to their column's out-of-vocabulary row: device: 7 rows, 1 distinct value" in r.stderr
    assert r.stdout.startswith("{")


def test_bad_values_in_the_hive_partition_path(cli, tmp_path, base_checkpoint, valid_table):
    """A directory whose files lack a column even though partition keys exist: named like any missing column."""
    d = tmp_path / "events" / "date=2026-11-01"
    d.mkdir(parents=True)
    path = write(valid_table.drop_columns(["device"]), d / "part-0.parquet")
    r = cli("evaluate", "--checkpoint", base_checkpoint, "--data", f"{tmp_path}/events/date=2026-11-*")
    assert_input_error(r, path, "missing column(s) device")
