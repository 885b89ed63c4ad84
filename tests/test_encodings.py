"""Categorical encodings (issue #23 item 1): identity, hash, vocab-file and vocab, chosen at init and
kept in the checkpoint; dense scaling; large vocabularies as checkpoint tensors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl.encodings import Lookup, parse_spec, stable_hash
from cogradctl.errors import UsageError
from cogradctl.schema import Feature, Schema, Task
from cogradctl.stream import ParquetStream
from tests.conftest import TINY_MMOE

M64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits, in Python integers: the oracle of the vectorised one."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    return h


def splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


# ---------------------------------------------------------------------------- the hash


def test_hash_matches_a_plain_python_reference_and_fixed_buckets():
    ints = [0, 1, 42, -1, 2**63 - 1, -(2**63)]
    got = stable_hash(pa.array(ints, pa.int64()), "int")
    assert [int(h) for h in got] == [splitmix64(v & M64) for v in ints]
    strings = ["", "a", "user_42", "ünïcødé", "x" * 300]
    got = stable_hash(pa.array(strings), "str")
    assert [int(h) for h in got] == [splitmix64(fnv1a64(s.encode())) for s in strings]
    # Fixed buckets: a change to the hash would silently move every hashed id of every checkpoint.
    assert [int(b) for b in stable_hash(pa.array([0, 1, 42]), "int") % 1000] == [535, 465, 413]
    assert [int(b) for b in stable_hash(pa.array(["a", "", "user_42"]), "str") % 1000] == [583, 8, 955]


def test_hash_is_the_same_in_another_process_and_for_sliced_or_dictionary_arrays():
    code = (
        "import pyarrow as pa; from cogradctl.encodings import stable_hash;"
        "print([int(h) for h in stable_hash(pa.array(['a', 'user_42', '']), 'str')])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    here = [int(h) for h in stable_hash(pa.array(["a", "user_42", ""]), "str")]
    assert json.loads(out) == here
    big = pa.array(["zz", "a", "user_42", "", "q"])
    assert [int(h) for h in stable_hash(big.slice(1, 3), "str")] == here  # an Arrow slice keeps its offset
    f = Feature("s", "categorical", value_type="str", encoding="hash", buckets=97)
    plain, _ = Lookup(f).rows(pa.array(["a", "user_42", "a", ""]))
    coded, _ = Lookup(f).rows(pa.array(["a", "user_42", "a", ""]).dictionary_encode())
    assert plain.tolist() == coded.tolist() == [h % 97 for h in [here[0], here[1], here[0], here[2]]]


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "text, message",
    [
        ("hash", "hash:N"),
        ("hash:0", "≥ 1"),
        ("hash:ten", "hash:N"),
        ("identity:10:oov=10", "not one of the 10 rows"),
        ("vocab-file:/x.txt", "needs its OOV row"),
        ("vocab:3", "takes no argument"),
        ("onehot", "unknown encoding"),
        ("hash:5:oov=1:oov=2", "given twice"),
    ],
)
def test_a_spec_that_does_not_parse_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message):
        parse_spec("user", text)


def test_specs_parse():
    assert parse_spec("u", "identity:100:oov=0:pad=99") == parse_spec("u", "identity:100:pad=99:oov=0")
    spec = parse_spec("u", "vocab-file:/a:b/v.txt:oov=3")
    assert (spec.kind, spec.path, spec.oov, spec.pad) == ("vocab-file", "/a:b/v.txt", 3, None)


# ---------------------------------------------------------------------------- data through the CLI


@pytest.fixture
def ids(tmp_path):
    """Label-encoded ids 0..99 (user), hashed-string-able ids (item), a tag for a vocabulary file."""
    rng = np.random.default_rng(0)
    n = 400
    user = rng.integers(0, 100, n)
    item = np.array([f"item_{i}" for i in rng.integers(0, 300, n)])
    tag = rng.choice(["red", "green", "blue", "black"], n)
    x = rng.normal(size=n) * 3 + 10
    click = (rng.random(n) < 0.3).astype(np.int64)
    like = (rng.random(n) < 0.2).astype(np.int64)
    table = pa.table({"user": user, "item": item, "tag": tag, "x": x, "click": click, "like": like})
    pq.write_table(table, tmp_path / "train.parquet")
    (tmp_path / "tags.txt").write_text("<unk>\nred\ngreen\nblue\n")
    return tmp_path, table


def init(cli, root, out, *extra):
    args = ["init", "--model", "mmoe", *TINY_MMOE, "--data", root / "train.parquet", "--tasks", "click,like"]
    return cli(*args, "--out", out, *extra)


ENCODED = [
    "--encoding",
    "user=identity:100",
    "--encoding",
    "item=hash:64",
    "--encoding",
    "tag=vocab-file:{root}/tags.txt:oov=0:pad=4",
    "--dense-scaling",
    "none",
]


def encoded_args(root):
    return [a.format(root=root) for a in ENCODED]


def test_identity_hash_and_vocab_file_keep_the_teams_rows(cli, ids):
    root, table = ids
    out = root / "init.safetensors"
    r = init(cli, root, out, *encoded_args(root), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["encodings"]["user"] == {"encoding": "identity", "rows": 100, "unmapped_rows": 0, "null_rows": 0}
    black = int((table.column("tag").to_numpy(zero_copy_only=False) == "black").sum())
    assert doc["encodings"]["tag"]["unmapped_rows"] == black > 0
    assert f"'tag' (vocab-file): {black} rows of 400 hold a value without a row of its own" in r.stderr
    schema = ckpt_io.load(out).schema
    feats = {f.name: f for f in schema.features}
    assert [feats[c].cardinality for c in ("user", "item", "tag")] == [100, 64, 5]  # tag: 4 lines, pad row 4
    with pytest.warns(UserWarning, match=f"tag: {black} rows, 1 distinct value"):
        enc = data_io.load(str(root / "train.parquet"), schema)
    cols = {f.name: k for k, f in enumerate(schema.categorical)}
    assert enc.categorical[:, cols["user"]].tolist() == table.column("user").to_pylist()  # identity round trip
    item_rows = [splitmix64(fnv1a64(v.encode())) % 64 for v in table.column("item").to_pylist()]
    assert enc.categorical[:, cols["item"]].tolist() == item_rows
    lines = {"<unk>": 0, "red": 1, "green": 2, "blue": 3}
    assert enc.categorical[:, cols["tag"]].tolist() == [lines.get(v, 0) for v in table.column("tag").to_pylist()]
    x = table.column("x").to_numpy()
    assert np.allclose(enc.dense[:, 0].numpy(), x.astype(np.float32))  # --dense-scaling none: as stored
    stream = ParquetStream(str(root / "train.parquet"), schema)
    (inputs, _), *_ = list(stream.batches(400, shuffle=False))
    assert torch.equal(inputs["categorical"], enc.categorical) and torch.equal(inputs["dense"], enc.dense)
    assert stream.stats["oov"] == {"tag": black}
    shown = json.loads(cli("inspect", out, "--json").stdout)["features"]
    assert [f.get("encoding") for f in shown] == ["identity:100:pad=0", "hash:64:pad=0", "vocab-file:oov=0:pad=4", None]
    assert shown[3]["scaling"] == "none" and (shown[3]["mean"], shown[3]["std"]) == (0.0, 1.0)
    # the whole loop runs on it
    run = root / "run"
    data = root / "train.parquet"
    r = cli("train", "--checkpoint", out, "--data", data, "--method", "cograd", "--out", run, "--max-steps", 3)
    assert r.exit_code == 0, r.output
    r = cli("evaluate", "--checkpoint", run / "last.safetensors", "--data", data, "--json")
    assert r.exit_code == 0, r.output
    r = cli("measure-transference", "--checkpoint", run / "last.safetensors", "--data", data, "--batches", 2, "--json")
    assert r.exit_code == 0, r.output


def test_out_of_range_identity_is_an_error_or_the_named_row(cli, ids, tmp_path):
    root, table = ids
    bad = table.set_column(0, "user", pa.array([*table.column("user").to_pylist()[:-1], 100]))
    pq.write_table(bad, root / "train.parquet")
    out = root / "a.safetensors"
    r = init(cli, root, out, "--encoding", "user=identity:100")
    assert r.exit_code == 2 and not out.exists()
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "categorical column 'user'" in line and "outside 0..99 (e.g. 100)" in line
    r = init(cli, root, out, "--encoding", "user=identity:100:oov=0", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["encodings"]["user"]["unmapped_rows"] == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tag=vocab-file:{root}/missing.txt:oov=0", "no such file"),
        ("tag=vocab-file:{root}/dup.txt:oov=0", "'red' is on lines 1 and 3"),
        ("tag=hash:0", "≥ 1"),
        ("tag=identity:10", "identity needs integer row indices"),
        ("x=hash:10", "'x' is a dense feature"),
        ("nope=hash:10", "'nope' is not a feature"),
    ],
)
def test_bad_encodings_are_one_line_exit_2_and_write_nothing(cli, ids, spec, message):
    root, _ = ids
    (root / "dup.txt").write_text("red\ngreen\nred\n")
    out = root / "bad.safetensors"
    r = init(cli, root, out, "--encoding", spec.format(root=root))
    assert r.exit_code == 2 and not out.exists(), r.output
    assert message in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_a_null_without_an_oov_row_is_an_error_naming_the_column(cli, ids):
    root, table = ids
    items = table.column("item").to_pylist()
    pq.write_table(table.set_column(1, "item", pa.array([None, *items[1:]])), root / "train.parquet")
    r = init(cli, root, root / "a.safetensors", "--encoding", "item=hash:64")
    assert r.exit_code == 2 and "'item'" in r.stderr and "1 null value(s)" in r.stderr and ":oov=R" in r.stderr
    r = init(cli, root, root / "a.safetensors", "--encoding", "item=hash:64:oov=7")
    assert r.exit_code == 0, r.output
    schema = ckpt_io.load(root / "a.safetensors").schema
    enc = data_io.load(str(root / "train.parquet"), schema)
    assert enc.categorical[0, 1].item() == 7  # the null took the named row


def test_max_vocab_truncation_is_reported_with_counts(cli, ids):
    root, table = ids
    r = init(cli, root, root / "a.safetensors", "--max-vocab", "40", "--json")
    assert r.exit_code == 0, r.output
    counts = pa.table({"u": table.column("user")}).group_by("u").aggregate([("u", "count")])
    freq = sorted(
        zip(counts.column("u_count").to_pylist(), counts.column("u").to_pylist()), key=lambda t: (-t[0], str(t[1]))
    )
    cut_rows = sum(n for n, _ in freq[40:])
    got = json.loads(r.stdout)["encodings"]["user"]["cut_by_max_vocab"]
    assert got == {"values": len(freq) - 40, "rows": cut_rows}
    assert f"--max-vocab cut {len(freq) - 40} values from the vocabulary of 'user'" in r.stderr
    assert f"{cut_rows} rows of 400 hold one" in r.stderr


# ---------------------------------------------------------------------------- checkpoints


def test_a_ten_million_row_vocabulary_is_stored_as_tensors_not_in_the_header(tmp_path):
    n = 10_000_000
    values = pa.array(np.arange(n, dtype=np.int64)[::-1] * 7)  # not sorted, not a small span
    words = pa.array([f"w{i}" for i in range(20_000)])
    feats = [
        Feature("big", "categorical", vocab=values, value_type="int", encoding="vocab-file", buckets=n + 1, oov=n),
        Feature("word", "categorical", vocab=words, value_type="str"),
        Feature("small", "categorical", vocab=[3, 1, 2], value_type="int"),
    ]
    schema = Schema(feats, [Task("click")])
    path = tmp_path / "big.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", {}, schema, {"w": torch.zeros(2)}, []), path)
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    assert header < 20_000  # the values are tensors; the header holds their sizes
    back = ckpt_io.load(path)
    assert back.extra == {}  # vocabulary tensors are the schema's, not carried as extra tensors
    got = {f.name: f for f in back.schema.features}
    assert got["big"].vocab.equals(values) and got["big"].cardinality == n + 1
    assert got["word"].vocab.to_pylist() == words.to_pylist() and got["word"].cardinality == 20_001
    assert got["small"].vocab == [3, 1, 2]
    assert ckpt_io.read_checked(path).schema.features[0].vocab.equals(values)
    rows, _ = Lookup(got["big"]).rows(pa.array([values[5].as_py(), 1]))
    assert rows.tolist() == [5, n]  # 1 is not a multiple of 7: the OOV row


def test_a_checkpoint_written_before_encodings_still_loads(tmp_path):
    """A schema JSON without the encoding fields (as every earlier cogradctl wrote it) reads as vocab."""
    old = {
        "features": [
            {"name": "d", "kind": "categorical", "vocab": ["a", "b"], "value_type": "str", "mean": 0.0, "std": 1.0},
            {"name": "x", "kind": "dense", "vocab": [], "value_type": "", "mean": 2.0, "std": 3.0},
        ],
        "tasks": [{"name": "click", "type": "binary"}],
    }
    schema = Schema.from_json(json.dumps(old))
    d, x = schema.features
    assert (d.encoding, d.cardinality, x.scaling) == ("vocab", 3, "standard")
    rows, unmapped = Lookup(d).rows(pa.array(["b", "z", None]))
    assert rows.tolist() == [2, 0, 0] and unmapped.tolist() == [False, True, False]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"encoding": "identity", "buckets": 10, "vocab": [], "value_type": "str"}, "identity encoding needs integer"),
        ({"encoding": "hash", "buckets": 10, "oov": 10, "vocab": []}, "oov and pad must be rows"),
        ({"encoding": "hash", "buckets": 0, "vocab": []}, "buckets must be a positive"),
        ({"encoding": "vocab-file", "buckets": 1, "oov": 0}, "buckets ≥ its values"),
        ({"encoding": "hash", "buckets": 10}, "keeps no vocabulary"),
        ({"encoding": "crc"}, "encoding must be one of"),
    ],
)
def test_inconsistent_encoding_fields_are_refused(change, message):
    d = {"name": "d", "kind": "categorical", "vocab": [1, 2], "value_type": "int", **change}
    with pytest.raises(ValueError, match=message):
        Schema.from_dict({"features": [d], "tasks": [{"name": "t"}]})


def test_a_vocabulary_stored_as_tensors_does_not_count_against_the_header_budget(cli, ids, monkeypatch):
    """The header budget applies to what stays in the header: a 12,000-line vocabulary file of long
    values (about 1.3 MB as JSON) passes a 20 kB budget, since its values are tensors."""
    from cogradctl import infer

    root, table = ids
    monkeypatch.setattr(infer, "SCHEMA_HEADER_BUDGET", 20_000)
    lines = [f"{'x' * 100}{i}" for i in range(12_000)] + ["red", "green", "blue", "black"]
    (root / "long.txt").write_text("\n".join(lines) + "\n")
    out = root / "long.safetensors"
    r = init(cli, root, out, "--encoding", f"tag=vocab-file:{root}/long.txt:oov=0")
    assert r.exit_code == 0, r.output
    tag = next(f for f in ckpt_io.load(out).schema.features if f.name == "tag")
    assert tag.vocab.to_pylist() == lines and tag.cardinality == len(lines)


def test_original_ids_read_a_vocabulary_held_as_an_arrow_array():
    """A vocabulary over 10,000 values comes back from a checkpoint as an Arrow array: OriginalIds
    maps its rows to the plain values (and to_id receives plain Python values)."""
    from cogradctl.layers import OriginalIds

    f = Feature("u", "categorical", vocab=pa.array([5, 7, 9]), value_type="int")
    seen = []
    ids = OriginalIds(Schema([f], [Task("t")]), to_id=lambda name, v: seen.append(v) or v * 10, missing_id=-1)
    assert ids(torch.tensor([[0], [1], [3]])).tolist() == [[-1], [50], [90]] and seen == [5, 7, 9]
    assert all(type(v) is int for v in seen)
