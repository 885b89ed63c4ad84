"""``cogradctl data prepare census-kdd``: the UCI Census-Income converter, on the tiny fixture in
tests/data/census_tiny/ (30 training and 20 test lines in the UCI format; see its README.md), so the
suite never needs /work/shared."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogradctl import census

TINY = Path(__file__).parent / "data" / "census_tiny"


def raw_lines(name: str) -> list[str]:
    with gzip.open(TINY / name, "rt") as f:
        return [line for line in f if line.strip()]


def field(line: str, column: str) -> str:
    return [v.strip() for v in line.rstrip().rstrip(".").split(",")][census.COLUMNS.index(column)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("census") / "g1"
    census.prepare(TINY, out, group="1")
    return out


def test_cli_writes_three_splits_and_a_description(cli, tmp_path):
    result = cli("data", "prepare", "census-kdd", "--source", TINY, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {k: v["rows"] for k, v in summary["splits"].items()} == {"train": 30, "valid": 10, "test": 10}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "census.json",
        "test.parquet",
        "train.parquet",
        "valid.parquet",
    ]
    assert json.loads((tmp_path / "out" / "census.json").read_text()) == summary
    again = cli("data", "prepare", "census-kdd", "--source", TINY, "--out", tmp_path / "out")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_columns_types_and_dropped_columns(prepared):
    table = pq.read_table(prepared / "train.parquet")
    # 42 UCI columns − instance weight − the two label sources (income class, marital status) + 2 labels.
    assert table.num_columns == 41
    names = table.column_names
    assert names[-2:] == ["income", "marital"]
    for gone in ("instance_weight", "income_class", "marital_stat"):
        assert gone not in names
    assert "education" in names and "detailed_household_summary_in_household" in names
    types = dict(zip(names, table.schema.types))
    for col in census.CONTINUOUS:
        assert types[col] == pa.float64(), col
    for col in census.CODED:
        assert types[col] == pa.int32(), col
    assert types["class_of_worker"] == pa.string()
    assert types["income"] == types["marital"] == pa.int8()
    # Values are trimmed: the UCI separator is ", " and some values end in a space.
    assert "Native- Born in the United States" in table.column("citizenship").to_pylist()


def test_labels_match_the_raw_lines(prepared):
    lines = raw_lines(census.FILES["train"])
    table = pq.read_table(prepared / "train.parquet")
    assert table.column("income").to_pylist() == [int(field(l, "income_class") == "50000+") for l in lines]
    assert table.column("marital").to_pylist() == [int(field(l, "marital_stat") == "Never married") for l in lines]
    assert 0 < sum(table.column("income").to_pylist()) < len(lines)
    assert 0 < sum(table.column("marital").to_pylist()) < len(lines)
    assert table.column("age").to_pylist() == [float(field(l, "age")) for l in lines]


def test_question_mark_is_null(prepared):
    lines = raw_lines(census.FILES["train"])
    table = pq.read_table(prepared / "train.parquet")
    col = table.column("migration_code_change_in_msa").to_pylist()
    expected = [
        None if field(l, "migration_code_change_in_msa") == "?" else field(l, "migration_code_change_in_msa")
        for l in lines
    ]
    assert col == expected and None in col and any(v is not None for v in col)
    assert "?" not in {v for c in table.columns if c.type == pa.string() for v in c.to_pylist()}


def test_test_file_is_halved_with_a_fixed_seed(prepared, tmp_path):
    valid, test = pq.read_table(prepared / "valid.parquet"), pq.read_table(prepared / "test.parquet")
    assert valid.num_rows == test.num_rows == 10
    raw_ages = sorted(float(field(l, "age")) for l in raw_lines(census.FILES["test"]))
    assert sorted(valid.column("age").to_pylist() + test.column("age").to_pylist()) == raw_ages
    census.prepare(TINY, tmp_path / "again", group="1")
    assert pq.read_table(tmp_path / "again" / "valid.parquet").equals(valid)
    census.prepare(TINY, tmp_path / "other", group="1", seed=7)
    assert not pq.read_table(tmp_path / "other" / "valid.parquet").equals(valid)


def test_groups_and_drop_leaky(tmp_path):
    census.prepare(TINY, tmp_path / "g2", group="2")
    t2 = pq.read_table(tmp_path / "g2" / "train.parquet")
    assert t2.column_names[-2:] == ["education", "marital"]
    assert "education" not in t2.column_names[:-2] and "income_class" in t2.column_names
    lines = raw_lines(census.FILES["train"])
    assert t2.column("education").to_pylist() == [int(field(l, "education") in census.COLLEGE) for l in lines]
    census.prepare(TINY, tmp_path / "all", group="all", drop_leaky=True)
    t = pq.read_table(tmp_path / "all" / "train.parquet")
    assert t.column_names[-3:] == ["income", "marital", "education"]
    assert t.num_columns == 42 - 1 - 3 - 2 + 3
    assert not set(census.LEAKY) & set(t.column_names)


def test_output_feeds_init(cli, prepared, tmp_path):
    """The tool reads the kinds as documented: floats dense, strings and integer codes categorical."""
    result = cli(
        "init",
        "--model",
        "mmoe",
        "--data",
        prepared / "train.parquet",
        "--tasks",
        "income,marital",
        "--out",
        tmp_path / "i.safetensors",
        "--config",
        "num_experts=2",
        "--config",
        "expert=[8]",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    kinds = json.loads(result.stdout)["features"]
    assert (
        kinds["age"] == "dense" and kinds["detailed_industry_recode"] == "categorical" and kinds["sex"] == "categorical"
    )
    assert len(kinds) == 39


def _copy_fixture(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    return src


def test_truncated_gzip_is_a_one_line_error(cli, tmp_path):
    src = _copy_fixture(tmp_path)
    path = src / census.FILES["test"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = cli("data", "prepare", "census-kdd", "--source", src, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "census-income.test.gz" in result.stderr and "truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "valid.parquet").exists()


def test_wrong_column_count_names_file_and_line(cli, tmp_path):
    src = _copy_fixture(tmp_path)
    lines = raw_lines(census.FILES["train"])
    fields = lines[6].split(", ")
    lines[6] = ", ".join(fields[:10] + fields[11:])  # one column lost on line 7
    with gzip.open(src / census.FILES["train"], "wt") as f:
        f.writelines(lines)
    result = cli("data", "prepare", "census-kdd", "--source", src, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "census-income.data.gz: line 7 has 41 columns, expected 42" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["missing", "not-gzip", "bad-number"])
def test_missing_or_wrong_source_file(cli, tmp_path, damage):
    src = _copy_fixture(tmp_path)
    path = src / census.FILES["train"]
    if damage == "missing":
        path.unlink()
        expected = "no such file"
    elif damage == "not-gzip":
        path.write_bytes(b"age, class of worker\n")
        expected = "not a readable gzip file"
    else:
        lines = raw_lines(census.FILES["train"])
        lines[0] = "old," + lines[0].split(",", 1)[1]  # a word where the age should be
        with gzip.open(path, "wt") as f:
            f.writelines(lines)
        expected = "column 'age' has a non-numeric value"
    result = cli("data", "prepare", "census-kdd", "--source", src, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert "census-income.data.gz" in result.stderr and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_group_and_missing_source_dir(cli, tmp_path):
    result = cli("data", "prepare", "census-kdd", "--source", TINY, "--out", tmp_path / "o", "--group", "3")
    assert result.exit_code == 2 and "--group 3" in result.stderr
    result = cli("data", "prepare", "census-kdd", "--source", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no such directory" in result.stderr
