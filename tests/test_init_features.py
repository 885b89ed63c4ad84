"""Which columns ``init`` (and ``import``) can make features (issue #25 item 11).

Every column that cannot be a feature is named in one error, with its type and what to do;
``--exclude-features`` leaves columns out of the default feature set; hive partition keys are
columns at ``init`` as they are when the stream reads (docs/data.md), and the stream encodes them
against the vocabulary ``init`` made.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogradctl import checkpoint as ckpt_io
from cogradctl.stream import ParquetStream
from tests.conftest import TINY_MMOE

ROWS = 64


def table(seed: int = 0, **extra) -> pa.Table:
    """A small ad log: a float, an id, a boolean, two labels, and ``extra`` columns."""
    rng = np.random.default_rng(seed)
    cols = {
        "price": pa.array(rng.normal(size=ROWS)),
        "user": pa.array(rng.integers(0, 5, ROWS)),
        "is_new": pa.array(rng.integers(0, 2, ROWS).astype(bool)),
        "click": pa.array(rng.integers(0, 2, ROWS)),
        "like": pa.array(rng.integers(0, 2, ROWS)),
    }
    return pa.table({**cols, **extra})


def awkward() -> pa.Table:
    """A table with a list of timestamps, a timestamp and a struct column, none of which can be a
    feature (lists of integers, strings or floats can: sequence and vector features)."""
    start = dt.datetime(2026, 11, 1)
    return table(
        tags=pa.array([[start, start]] * ROWS, type=pa.list_(pa.timestamp("us"))),
        ts=pa.array([start + dt.timedelta(minutes=i) for i in range(ROWS)], type=pa.timestamp("us")),
        geo=pa.array([{"lat": 1.0, "lon": 2.0}] * ROWS),
    )


def init(cli, data, out, *extra):
    return cli("init", "--model", "mmoe", *TINY_MMOE, "--data", data, "--tasks", "click,like", "--out", out, *extra)


def one_error(result) -> str:
    """The one ``error:`` line of a failed command with exit 2 (nothing on stdout, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == "" and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def features(out) -> dict:
    return {f.name: f for f in ckpt_io.load(out).schema.features}


def test_every_unusable_column_is_named_in_one_error(cli, tmp_path):
    pq.write_table(awkward(), tmp_path / "log.parquet")
    line = one_error(init(cli, tmp_path / "log.parquet", tmp_path / "m.safetensors"))
    assert "3 column(s) cannot be features" in line
    for col, typ in (("tags", "list<"), ("ts", "timestamp[us]"), ("geo", "struct<")):
        assert f"'{col}' is {typ}" in line, line
    assert "boolean" in line  # booleans are accepted (categorical): the list of types says so
    assert "--exclude-features tags,ts,geo" in line
    assert "hour of day" in line and "lists of timestamp[us] are not read" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_exclude_features_leaves_them_out(cli, tmp_path):
    pq.write_table(awkward(), tmp_path / "log.parquet")
    out = tmp_path / "m.safetensors"
    result = init(cli, tmp_path / "log.parquet", out, "--exclude-features", "tags, ts,geo", "--json")
    assert result.exit_code == 0, result.output
    kinds = json.loads(result.stdout)["features"]
    assert kinds == {"price": "dense", "user": "categorical", "is_new": "categorical"}
    assert features(out)["is_new"].value_type == "int" and sorted(features(out)["is_new"].vocab) == [0, 1]


def test_exclude_features_of_a_usable_column(cli, tmp_path):
    pq.write_table(table(), tmp_path / "log.parquet")
    out = tmp_path / "m.safetensors"
    assert init(cli, tmp_path / "log.parquet", out, "--exclude-features", "user").exit_code == 0
    assert list(features(out)) == ["price", "is_new"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--exclude-features", "tags,nope"], ["--exclude-features nope", "no column 'nope'"]),
        (["--exclude-features", "click"], ["--exclude-features click", "--tasks"]),
        (["--exclude-features", "user", "--categorical", "user"], ["--exclude-features user", "--categorical"]),
        (["--exclude-features", "user", "--features", "price"], ["--exclude-features", "--features", "not both"]),
    ],
)
def test_bad_exclude_features(cli, tmp_path, extra, words):
    pq.write_table(table(tags=pa.array([["a"]] * ROWS)), tmp_path / "log.parquet")
    line = one_error(init(cli, tmp_path / "log.parquet", tmp_path / "m.safetensors", *extra))
    for word in words:
        assert word in line, line


def test_chosen_features_that_cannot_be_used_are_named_together(cli, tmp_path):
    pq.write_table(awkward(), tmp_path / "log.parquet")
    line = one_error(init(cli, tmp_path / "log.parquet", tmp_path / "m.safetensors", "--features", "price,ts,tags"))
    assert "2 column(s) cannot be features" in line and "drop ts,tags from --features" in line


def write_days(root, days=("2026-11-01", "2026-11-02"), hours=(3, 7)) -> None:
    for k, (day, hour) in enumerate(zip(days, hours, strict=True)):
        folder = root / f"day={day}" / f"hour={hour}"
        folder.mkdir(parents=True)
        pq.write_table(table(seed=k), folder / "part-0.parquet")


def test_partition_keys_are_features_at_init_and_encoded_by_the_stream(cli, tmp_path):
    write_days(tmp_path / "events")
    out = tmp_path / "m.safetensors"
    result = init(cli, tmp_path / "events", out, "--dense", "hour")
    assert result.exit_code == 0, result.output
    assert "partition key(s) day, hour of the data's paths are features too" in result.stderr
    assert "--exclude-features day,hour" in result.stderr
    feats = features(out)
    assert feats["day"].kind == "categorical" and sorted(feats["day"].vocab) == ["2026-11-01", "2026-11-02"]
    assert feats["hour"].kind == "dense" and feats["hour"].mean == pytest.approx(5.0)
    # the stream fills the keys the same way: no value of them is out of the vocabulary
    stream = ParquetStream(str(tmp_path / "events"), ckpt_io.load(out).schema)
    inputs, _ = next(stream.batches(2 * ROWS, shuffle=False))
    day = [f.name for f in ckpt_io.load(out).schema.categorical].index("day")
    assert set(inputs["categorical"][:, day].tolist()) == {1, 2}
    assert stream.stats["oov"] == {}


def test_partition_keys_can_be_left_out_or_chosen(cli, tmp_path):
    write_days(tmp_path / "events")
    out = tmp_path / "m.safetensors"
    assert init(cli, tmp_path / "events", out, "--exclude-features", "day,hour").exit_code == 0
    assert "day" not in features(out) and "hour" not in features(out)
    result = init(cli, tmp_path / "events", out, "--features", "price,day", "--overwrite")
    assert result.exit_code == 0, result.output
    assert list(features(out)) == ["price", "day"] and "partition key" not in result.stderr


def test_a_partition_key_missing_from_a_later_file_is_named(cli, tmp_path):
    write_days(tmp_path / "events")
    pq.write_table(table(seed=9), tmp_path / "events" / "day=2026-11-02" / "late.parquet")  # no hour= folder
    line = one_error(init(cli, tmp_path / "events", tmp_path / "m.safetensors"))
    assert "late.parquet: missing column(s) hour" in line and "partition key" in line


def test_a_stored_column_wins_over_a_partition_key_of_the_same_name(cli, tmp_path):
    folder = tmp_path / "day=7"
    folder.mkdir()
    pq.write_table(table(day=pa.array(["x"] * ROWS)), folder / "part.parquet")
    out = tmp_path / "m.safetensors"
    assert init(cli, folder, out).exit_code == 0
    assert features(out)["day"].vocab == ["x"]


def test_import_takes_exclude_features(cli, tmp_path):
    """import reads the sample as init does: --exclude-features, and values --min-count prunes counted
    in rows and in distinct values."""
    counts = awkward().column("user").value_counts().to_pylist()
    rare = [c["counts"] for c in counts if c["counts"] < 14]
    assert rare and len(rare) < len(counts), counts  # the seeded sample has ids seen fewer than 14 times
    pq.write_table(awkward(), tmp_path / "log.parquet")
    made = tmp_path / "made.safetensors"
    schema_opts = ("--exclude-features", "tags,ts,geo", "--min-count", "14")
    assert init(cli, tmp_path / "log.parquet", made, *schema_opts).exit_code == 0
    weights = tmp_path / "weights.pt"
    assert cli("export", made, "--out", weights).exit_code == 0
    args = ["import", "--model", "mmoe", *TINY_MMOE, "--weights", weights, "--data", tmp_path / "log.parquet"]
    args += ["--tasks", "click,like", "--out", tmp_path / "imported.safetensors", "--min-count", "14"]
    line = one_error(cli(*args))
    assert "--exclude-features tags,ts,geo" in line
    result = cli(*args, "--exclude-features", "tags,ts,geo", "--json")
    assert result.exit_code == 0, result.output
    assert list(features(tmp_path / "imported.safetensors")) == ["price", "user", "is_new"]
    vocab = json.loads(result.stdout)["vocabulary"]
    assert vocab["sample_oov"]["user"] == sum(rare) and vocab["sample_oov_distinct"]["user"] == len(rare)
    assert f"outside it: {sum(rare)} sample value(s), {len(rare)} distinct" in result.stderr
