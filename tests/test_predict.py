"""cogradctl predict: per-row predictions equal the model's own forward on data.load, in the input's
order, keep-columns carried with their types, independent of the batch size; invalid rows counted;
bad input one line + exit 2 with nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data, sample
from cogradctl import predict as predict_mod
from cogradctl.evaluate import predict_with_labels
from cogradctl.models import from_checkpoint
from cogradctl.stream import ParquetStream

TASKS = ["click", "like", "share"]
CPU = ("--device", "cpu", "--quiet")
TINY_MMOE = ["--config", "num_experts=2", "--config", "expert=[16]", "--config", "tower=[8]"]  # as conftest's


def scaled(src, dst):
    """``src`` with every weight ×4, so that outputs spread far from 0 (probabilities near 0 and 1)."""
    ckpt = ckpt_io.load(src)
    ckpt.state = {k: v * 4 if v.is_floating_point() else v for k, v in ckpt.state.items()}
    ckpt_io.save(ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, base_checkpoint):
    return scaled(base_checkpoint, tmp_path_factory.mktemp("predict") / "scaled.safetensors")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A directory of three files (700 rows in row groups of 256, 0 rows, 1100 in groups of 300),
    with extra columns: ``id`` (global row number), a timestamp and a float with nulls."""
    root = tmp_path_factory.mktemp("parts")
    start = 0
    for name, rows, group, seed in (("a", 700, 256, 5), ("b", 0, None, 6), ("c", 1100, 300, 7)):
        t = sample.generate(rows, seed=seed)
        ids = np.arange(start, start + rows, dtype=np.int64)
        t = t.append_column("id", pa.array(ids))
        t = t.append_column("ts", pa.array(ids * 1000, pa.timestamp("ms")))
        t = t.append_column("score", pa.array([None if i % 7 == 0 else i / 3 for i in ids], pa.float64()))
        pq.write_table(t, root / f"{name}.parquet", row_group_size=group)
        start += rows
    return root


def oracle(ckpt_path, spec) -> dict[str, np.ndarray]:
    """The model's own forward on data.load of the same data: sigmoid(logit) or the raw output, float64."""
    ck, model, _ = from_checkpoint(ckpt_path)
    model.eval()
    ds = data.load(str(spec), ck.schema)
    with torch.no_grad():
        out = model({"dense": ds.dense, "categorical": ds.categorical})
    return {
        t.name: (torch.sigmoid(out[t.name].double()) if t.type == "binary" else out[t.name].double()).numpy()
        for t in ck.schema.tasks
    }


def run(cli, ckpt, spec, out, *args):
    r = cli("predict", "--checkpoint", ckpt, "--data", spec, "--out", out, *CPU, "--json", *args)
    assert r.exit_code == 0, (r.output, r.exception)
    return json.loads(r.stdout)


def assert_one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_predictions_equal_the_models_own_forward(cli, tmp_path, ckpt, sample_dir):
    valid = sample_dir / "valid.parquet"
    summary = run(cli, ckpt, valid, tmp_path / "p.parquet")
    got = pq.read_table(tmp_path / "p.parquet")
    want = oracle(ckpt, valid)
    assert got.column_names == TASKS and all(got.schema.field(t).type == pa.float64() for t in TASKS)
    for t in TASKS:
        assert np.abs(got.column(t).to_numpy() - want[t]).max() <= 1e-6
    spread = got.column("click").to_numpy()
    assert spread.min() < 0.05 and spread.max() > 0.95  # the scaled model is not a constant
    # the very numbers evaluate scores
    ck, model, _ = from_checkpoint(ckpt)
    preds, _ = predict_with_labels(model, ParquetStream(str(valid), ck.schema), ck.schema, 512)
    assert np.array_equal(np.stack([got.column(t).to_numpy() for t in TASKS], axis=1), preds)
    assert summary["rows_read"] == summary["rows_written"] == 500 and summary["rows_dropped"] == 0
    assert summary["tasks"]["click"]["output"] == "probability"
    assert summary["out"] == str(tmp_path / "p.parquet") and summary["columns"] == TASKS
    assert summary["seconds"] >= 0 and summary["checkpoint"] == str(ckpt)
    assert abs(summary["tasks"]["like"]["mean"] - want["like"].mean()) < 1e-6
    assert json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"cogradctl"])["tasks"]["share"] == "probability"


def test_order_across_files_row_groups_and_batches_with_keep_columns(cli, tmp_path, ckpt, parts):
    summary = run(cli, ckpt, parts, tmp_path / "p.parquet", "--batch-size", "97", "--keep-columns", "id,ts,score")
    got = pq.read_table(tmp_path / "p.parquet")
    assert summary["rows_written"] == got.num_rows == 1800
    assert got.column_names == ["id", "ts", "score", *TASKS]
    assert np.array_equal(got.column("id").to_numpy(), np.arange(1800))  # input order, not shuffled
    inputs = pq.read_table(parts, columns=["id", "ts", "score"])  # files in sorted order
    assert got.select(["id", "ts", "score"]).equals(inputs)  # values, nulls and Arrow types unchanged
    want = oracle(ckpt, parts)
    for t in TASKS:
        assert np.abs(got.column(t).to_numpy() - want[t]).max() <= 1e-6


def test_keep_columns_keep_their_types(cli, tmp_path, ckpt, sample_dir):
    t = sample.generate(300, seed=3)
    t = t.append_column("tag", pa.array([f"t{i % 5}" for i in range(300)]).dictionary_encode())
    t = t.append_column("flag", pa.array([i % 2 == 0 for i in range(300)]))
    t = t.append_column("small", pa.array(np.arange(300, dtype=np.uint16)))
    pq.write_table(t, tmp_path / "in.parquet")
    keep = ["device", "category", "tag", "flag", "small"]  # device and category are features too
    run(cli, ckpt, tmp_path / "in.parquet", tmp_path / "p.parquet", "--keep-columns", ",".join(keep))
    got = pq.read_table(tmp_path / "p.parquet")
    assert got.select(keep).equals(pq.read_table(tmp_path / "in.parquet", columns=keep))
    assert got.schema.field("device").type == pa.string() and got.schema.field("category").type == pa.int32()


def test_hive_partition_key_as_a_keep_column(cli, tmp_path, ckpt):
    for day in ("2026-11-01", "2026-11-02"):
        d = tmp_path / "events" / f"day={day}" / "hour=7"
        d.mkdir(parents=True)
        pq.write_table(sample.generate(40, seed=int(day[-1])), d / "part.parquet")
    run(cli, ckpt, f"{tmp_path}/events/day=*", tmp_path / "p.parquet", "--keep-columns", "day,hour")
    got = pq.read_table(tmp_path / "p.parquet")
    assert got.column("day").to_pylist() == ["2026-11-01"] * 40 + ["2026-11-02"] * 40
    assert got.schema.field("hour").type == pa.int64() and set(got.column("hour").to_pylist()) == {7}


def test_output_does_not_depend_on_the_batch_size(cli, tmp_path, ckpt, parts, monkeypatch):
    """Rows, order, kept columns, schema and row groups are identical; the float32 forward itself
    rounds differently for different batch shapes (CPU matmul kernels), so the values agree to
    float32 rounding, not bit for bit. The same batch size gives the same bytes."""
    monkeypatch.setattr(predict_mod, "ROW_GROUP", 500)  # several output row groups: 500, 500, 500, 300
    tables, files = [], {}
    for bs in ("1", "64", "300", "8192"):
        run(cli, ckpt, parts, tmp_path / f"p{bs}.parquet", "--batch-size", bs, "--keep-columns", "id")
        files[bs] = pq.ParquetFile(tmp_path / f"p{bs}.parquet")
        tables.append(pq.read_table(tmp_path / f"p{bs}.parquet"))
    for bs, t in zip(("64", "300", "8192"), tables[1:]):
        assert t.schema.equals(tables[0].schema, check_metadata=True)
        assert t.column("id").equals(tables[0].column("id"))
        assert files[bs].metadata.num_row_groups == files["1"].metadata.num_row_groups == 4
        for task in TASKS:
            assert np.abs(t.column(task).to_numpy() - tables[0].column(task).to_numpy()).max() <= 1e-6
    run(cli, ckpt, parts, tmp_path / "again.parquet", "--batch-size", "64", "--keep-columns", "id")
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "p64.parquet").read_bytes()


def test_data_without_label_columns(cli, tmp_path, ckpt, sample_dir):
    valid = sample_dir / "valid.parquet"
    pq.write_table(pq.read_table(valid).drop_columns(TASKS), tmp_path / "unlabelled.parquet")
    run(cli, ckpt, tmp_path / "unlabelled.parquet", tmp_path / "a.parquet")
    run(cli, ckpt, valid, tmp_path / "b.parquet")
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    # the stream without labels encodes the features exactly as the stream with them
    ck = ckpt_io.load(ckpt)
    ((d0, c0, _),) = ParquetStream(str(tmp_path / "unlabelled.parquet"), ck.schema, labels=False).in_order()
    ((x, y),) = ParquetStream(str(valid), ck.schema).batches(10_000, shuffle=False)
    assert torch.equal(torch.from_numpy(d0), x["dense"]) and torch.equal(torch.from_numpy(c0), x["categorical"])


def bad_rows_file(path):
    """200 rows: f0 NaN in row 3 and inf in row 150 (invalid), f1 null in row 5 (a missing value),
    a null label in row 7 (labels are not read: not invalid)."""
    t = sample.generate(200, seed=4).append_column("id", pa.array(np.arange(200)))
    f0 = t.column("f0").to_numpy().copy()
    f0[[3, 150]] = [np.nan, np.inf]
    f1 = t.column("f1").to_pylist()
    f1[5] = None
    click = t.column("click").to_pylist()
    click[7] = None
    for name, arr in (("f0", pa.array(f0)), ("f1", pa.array(f1, pa.float32())), ("click", pa.array(click, pa.int8()))):
        t = t.set_column(t.schema.get_field_index(name), name, arr)
    pq.write_table(t, path)
    return path


def test_invalid_rows_error_or_drop_and_count(cli, tmp_path, ckpt):
    bad = bad_rows_file(tmp_path / "bad.parquet")
    out = tmp_path / "p.parquet"
    r = cli("predict", "--checkpoint", ckpt, "--data", bad, "--out", out, *CPU)
    assert_one_line_error(r, bad, "2 invalid row(s)", "'f0' 2", "--on-invalid-rows drop")
    assert not out.exists() and leftovers(tmp_path) == []
    r = cli(*"predict --on-invalid-rows drop --keep-columns id --json --device cpu".split(), "--checkpoint", ckpt,
            "--data", bad, "--out", out)  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["rows_read"], summary["rows_written"], summary["rows_dropped"]) == (200, 198, 2)
    assert "dropped 2 invalid row(s)" in r.stderr  # never silent, even next to --json
    ids = pq.read_table(out).column("id").to_numpy()
    assert np.array_equal(ids, np.delete(np.arange(200), [3, 150]))


def test_regression_task_outputs_raw_values(cli, tmp_path, sample_dir):
    base = tmp_path / "reg.safetensors"
    r = cli("init", "--model", "mmoe", *TINY_MMOE, "--data", sample_dir / "train.parquet", "--tasks", "click,like",
            "--task-type", "like=regression", "--out", base, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    ckpt = scaled(base, tmp_path / "reg-scaled.safetensors")
    valid = sample_dir / "valid.parquet"
    summary = run(cli, ckpt, valid, tmp_path / "p.parquet")
    got = pq.read_table(tmp_path / "p.parquet")
    want = oracle(ckpt, valid)
    for t in ("click", "like"):
        assert np.abs(got.column(t).to_numpy() - want[t]).max() <= 1e-6
    like = got.column("like").to_numpy()
    assert like.min() < 0 or like.max() > 1  # not squashed into (0, 1)
    assert summary["tasks"]["like"]["output"] == "value" and summary["tasks"]["click"]["output"] == "probability"


def test_human_output(cli, tmp_path, ckpt, sample_dir):
    out = tmp_path / "p.parquet"
    r = cli("predict", "--checkpoint", ckpt, "--data", sample_dir / "valid.parquet", "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert str(out) in r.stdout and "rows=500" in r.stdout and "probability" in r.stdout
    assert "predicting click, like, share" in r.stderr


def test_overwrite_replaces_and_a_failed_run_keeps_the_old_output(cli, tmp_path, ckpt, sample_dir):
    out = tmp_path / "p.parquet"
    out.write_bytes(b"old")
    r = cli("predict", "--checkpoint", ckpt, "--data", sample_dir / "valid.parquet", "--out", out, *CPU)
    assert_one_line_error(r, out, "--overwrite")
    assert out.read_bytes() == b"old"
    bad = bad_rows_file(tmp_path / "bad.parquet")
    r = cli("predict", "--checkpoint", ckpt, "--data", bad, "--out", out, "--overwrite", *CPU)
    assert_one_line_error(r, "invalid row(s)")  # fails while streaming: the old file stays, no temp file
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []
    run(cli, ckpt, sample_dir / "valid.parquet", out, "--overwrite")
    assert pq.read_table(out).num_rows == 500


@pytest.mark.parametrize("case", ["missing-keep", "keep-is-a-task", "keep-twice", "out-is-input", "out-is-dir",
                                  "missing-feature", "bad-checkpoint", "batch-size"])  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, ckpt, sample_dir, case):
    valid = tmp_path / "valid.parquet"
    valid.write_bytes((sample_dir / "valid.parquet").read_bytes())
    before = valid.read_bytes(), os.stat(valid).st_mtime_ns
    out, checkpoint, spec, extra, needles = tmp_path / "p.parquet", ckpt, valid, [], []
    if case == "missing-keep":
        extra, needles = ["--keep-columns", "device,user_id"], [valid, "'user_id'"]
    elif case == "keep-is-a-task":
        extra, needles = ["--keep-columns", "like"], ["--keep-columns like", "task"]
    elif case == "keep-twice":
        extra, needles = ["--keep-columns", "device,device"], ["device", "twice"]
    elif case == "out-is-input":
        out, extra, needles = tmp_path / "." / "valid.parquet", ["--overwrite"], ["--out", "input"]
    elif case == "out-is-dir":
        out, needles = tmp_path, ["is a directory"]
    elif case == "missing-feature":
        spec = tmp_path / "nof0.parquet"
        pq.write_table(pq.read_table(valid).drop_columns(["f0"]), spec)
        needles = [spec, "f0"]
    elif case == "bad-checkpoint":
        checkpoint = tmp_path / "junk.safetensors"
        checkpoint.write_bytes(b"not a checkpoint at all")
        needles = [checkpoint]
    else:
        extra, needles = ["--batch-size", "0"], ["--batch-size"]
    r = cli("predict", "--checkpoint", checkpoint, "--data", spec, "--out", out, *CPU, *extra)
    assert_one_line_error(r, *needles)
    assert (valid.read_bytes(), os.stat(valid).st_mtime_ns) == before
    names = {p.name for p in tmp_path.iterdir()}
    assert "p.parquet" not in names and leftovers(tmp_path) == []


def test_keep_column_typed_differently_across_files(cli, tmp_path, ckpt):
    for name, typ in (("a", pa.int64()), ("b", pa.int32())):
        t = sample.generate(20, seed=1).append_column("id", pa.array(np.arange(20), typ))
        pq.write_table(t, tmp_path / f"{name}.parquet")
    r = cli("predict", "--checkpoint", ckpt, "--data", tmp_path, "--out", tmp_path / "out" / "p.parquet", *CPU,
            "--keep-columns", "id")  # fmt: skip
    assert_one_line_error(r, tmp_path / "b.parquet", "'id'", "int32", "int64")
    assert not (tmp_path / "out" / "p.parquet").exists()


class Recording(torch.nn.Module):
    """A model that records the rows of each forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes, self.modes = model, [], set()

    def forward(self, batch):
        self.sizes.append(len(batch["dense"]))
        self.modes.add((self.training, self.model.training, torch.is_grad_enabled()))
        return self.model(batch)


def test_streams_in_bounded_pieces(tmp_path, ckpt, parts):
    """The input is read a row group at a time and the model sees batches of exactly --batch-size
    rows across row-group and file boundaries (the last smaller); the whole input is never held."""
    ck, model, _ = from_checkpoint(ckpt)
    stream = ParquetStream(str(parts), ck.schema, labels=False)
    assert max(len(d) for d, _, _ in stream.in_order()) <= 300  # row groups of 256 and 300 rows
    rec = Recording(model).train()
    summary = predict_mod.predict(rec, stream, ck.schema, tmp_path / "p.parquet", ["id"], batch_size=97)
    assert rec.sizes == [97] * (1800 // 97) + [1800 % 97]
    assert summary["rows_written"] == 1800
    assert rec.modes == {(False, False, False)} and rec.training  # eval mode, no autograd; the mode restored
