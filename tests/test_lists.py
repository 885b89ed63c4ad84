"""List features (issue #23 item 2): sequence features (lists of ids or strings) and vector features
(fixed-length lists of floats), the batch format a plugin receives, and pooling in the built-in models."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl import models
from cogradctl.layers import FeatureInput
from cogradctl.stream import ParquetStream

ROWS = 120


def table(seed: int = 0) -> pa.Table:
    """A click history (ids, some null or empty lists, one null id), tags (strings), a 3-vector, an id."""
    rng = np.random.default_rng(seed)
    hist = [list(map(int, rng.integers(0, 30, rng.integers(0, 7)))) for _ in range(ROWS)]
    hist[0], hist[1], hist[2] = None, [], [5, None, 7]
    tags = [list(rng.choice(["red", "green", "blue"], rng.integers(1, 4))) for _ in range(ROWS)]
    vec = [list(map(float, rng.normal(size=3))) for _ in range(ROWS)]
    vec[3] = None
    return pa.table(
        {
            "hist": pa.array(hist, pa.list_(pa.int64())),
            "tags": pa.array(tags, pa.list_(pa.string())),
            "emb": pa.array(vec, pa.list_(pa.float32(), 3)),
            "user": rng.integers(0, 10, ROWS),
            "click": rng.integers(0, 2, ROWS),
            "like": rng.integers(0, 2, ROWS),
        }
    )


@pytest.fixture
def lists(tmp_path):
    t = table()
    pq.write_table(t, tmp_path / "train.parquet", row_group_size=50)
    return tmp_path, t


def init(cli, root, out, *extra, model="mmoe"):
    small = ["--config", "expert=[8]", "--config", "tower=[4]"] if model != "shared-bottom" else []
    args = ["init", "--model", model, *small, "--data", root / "train.parquet", "--tasks", "click,like"]
    return cli(*args, "--out", out, *extra)


def expected_rows(values, vocab, max_len, pad=0):
    """The sequence block of one feature by hand: vocabulary row (index + 1, 0 for null/unseen)."""
    out = np.full((len(values), max_len), pad, dtype=np.int64)
    lengths = np.zeros(len(values), dtype=np.int64)
    for i, lst in enumerate(values):
        lst = lst or []
        lengths[i] = min(len(lst), max_len)
        for j, v in enumerate(lst[:max_len]):
            out[i, j] = vocab.index(v) + 1 if v in vocab else 0
    return out, lengths


def test_batch_format_by_hand_and_the_stream_agrees(cli, lists):
    root, t = lists
    out = root / "init.safetensors"
    r = init(cli, root, out, "--max-len", "hist=4", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["encodings"]
    longer = sum(1 for v in t.column("hist").to_pylist() if v and len(v) > 4)
    assert report["hist"]["cut_rows"] == longer > 0 and report["hist"]["max_len"] == 4
    assert f"--max-len hist=4: {longer} rows of {ROWS} hold a longer list" in r.stderr
    schema = ckpt_io.load(out).schema
    kinds = {f.name: f.kind for f in schema.features}
    assert kinds == {"hist": "sequence", "tags": "sequence", "emb": "vector", "user": "categorical"}
    hist, tags = schema.sequences
    assert tags.max_len == 3  # the longest list at init
    with pytest.warns(UserWarning, match=f"hist: {longer} rows \\(max_len 4\\)"):
        data = data_io.load(str(root / "train.parquet"), schema)
    batch = data.inputs(slice(None))
    assert set(batch) == {"dense", "categorical", "sequence", "sequence_lengths", "vector"}
    h_rows, h_len = expected_rows(t.column("hist").to_pylist(), hist.vocab, 4)
    g_rows, g_len = expected_rows(t.column("tags").to_pylist(), tags.vocab, 3)
    assert np.array_equal(batch["sequence"].numpy(), np.concatenate([h_rows, g_rows], axis=1))
    assert np.array_equal(batch["sequence_lengths"].numpy(), np.stack([h_len, g_len], axis=1))
    assert batch["sequence"][2, :3].tolist() == [hist.vocab.index(5) + 1, 0, hist.vocab.index(7) + 1]  # null id → 0
    vec = np.array([v or [0.0, 0.0, 0.0] for v in t.column("emb").to_pylist()], dtype=np.float32)
    assert np.array_equal(batch["vector"].numpy(), vec) and batch["dense"].shape == (ROWS, 0)
    stream = ParquetStream(str(root / "train.parquet"), schema)
    parts = list(stream.batches(32, shuffle=False))
    for key in batch:
        assert torch.equal(torch.cat([p[0][key] for p in parts]), batch[key]), key
    assert stream.stats["truncated"] == {"hist": longer}


PLUGIN = '''
import torch
from torch import nn
from cogradctl.batch import slices

class Checked(nn.Module):
    """Fails loudly unless the batch has the documented format."""
    def __init__(self, schema):
        super().__init__()
        self.schema, self.where = schema, slices(schema)
        self.shared = nn.Linear(3, 3)
        self.out = nn.ModuleDict({t: nn.Linear(3, 1) for t in schema.task_names})
    def forward(self, batch):
        seq, lengths, vec = batch["sequence"], batch["sequence_lengths"], batch["vector"]
        assert seq.dtype == torch.int64 and lengths.dtype == torch.int64 and vec.dtype == torch.float32
        for s, f in enumerate(self.schema.sequences):
            part = seq[:, self.where[f.name]]
            assert part.shape[1] == f.max_len and (lengths[:, s] <= f.max_len).all()
            beyond = torch.arange(f.max_len) >= lengths[:, s : s + 1]
            assert (part[beyond] == f.pad).all() and (part >= 0).all() and (part < f.cardinality).all()
        assert vec.shape[1] == sum(f.size for f in self.schema.vectors)
        h = self.shared(vec)
        return {t: head(h).squeeze(-1) for t, head in self.out.items()}
    def task_parameters(self):
        return {t: [f"out.{t}.weight", f"out.{t}.bias"] for t in self.schema.task_names}

def build(schema):
    return Checked(schema)

MODELS = {"checked": build}
'''


def test_a_plugin_receives_the_documented_batch(cli, lists):
    root, _ = lists
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "checked.py").write_text(textwrap.dedent(PLUGIN))
    out = root / "p.safetensors"
    args = ["--plugin-path", plugins]
    r = cli(
        "init", "--model", "checked", "--data", root / "train.parquet", "--tasks", "click,like", "--out", out, *args
    )
    assert r.exit_code == 0, r.output
    r = cli(
        "train", "--checkpoint", out, "--data", root / "train.parquet", "--out", root / "run", "--max-steps", 3, *args
    )
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("model", ["shared-bottom", "mmoe", "ple"])
def test_every_built_in_model_trains_evaluates_and_measures_on_list_features(cli, lists, model):
    root, _ = lists
    out, run, data = root / "init.safetensors", root / "run", root / "train.parquet"
    assert init(cli, root, out, "--encoding", "tags=hash:8:oov=0", model=model).exit_code == 0
    r = cli("train", "--checkpoint", out, "--data", data, "--out", run, "--method", "pcgrad", "--max-steps", 3)
    assert r.exit_code == 0, r.output
    r = cli("evaluate", "--checkpoint", run / "last.safetensors", "--data", data, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == ROWS
    r = cli("measure-transference", "--checkpoint", run / "last.safetensors", "--data", data, "--batches", 2, "--json")
    assert r.exit_code == 0, r.output
    if model == "mmoe":  # predict's own reader (in order, columns carried) builds the same batch
        r = cli("predict", "--checkpoint", run / "last.safetensors", "--data", data, "--out", root / "p.parquet")
        assert r.exit_code == 0, r.output
        probs = pq.read_table(root / "p.parquet").column("click").to_numpy()
        net = models.from_checkpoint(run / "last.safetensors")[1].eval()
        schema = ckpt_io.load(run / "last.safetensors").schema
        with torch.no_grad():
            want = torch.sigmoid(net(data_io.load(str(data), schema).inputs(slice(None)))["click"]).numpy()
        assert np.allclose(probs, want, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_pooling_is_the_mean_or_sum_over_valid_positions(lists, cli, pooling):
    root, _ = lists
    out = root / "init.safetensors"
    assert init(cli, root, out).exit_code == 0
    schema = ckpt_io.load(out).schema
    layer = FeatureInput(schema, embedding_dim=4, pooling=pooling)
    batch = data_io.load(str(root / "train.parquet"), schema).inputs(slice(0, 10))
    got = layer(batch)
    weight = layer.embedding.weight.detach().double()
    first = schema.categorical[0].cardinality  # the sequence tables follow the categorical one
    c = len(schema.categorical) * 4
    for s in range(len(schema.sequences)):
        base = first + sum(g.cardinality for g in schema.sequences[:s])
        cols = slice(sum(g.max_len for g in schema.sequences[:s]), sum(g.max_len for g in schema.sequences[: s + 1]))
        for i in range(10):
            n = int(batch["sequence_lengths"][i, s])
            rows = batch["sequence"][i, cols][:n] + base
            want = weight[rows].sum(0) if n else torch.zeros(4, dtype=torch.float64)
            want = want / max(n, 1) if pooling == "mean" else want
            assert torch.allclose(got[i, c + 4 * s : c + 4 * s + 4].double(), want, atol=1e-6)


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array([[{"a": 1}]] * ROWS), "lists of struct<a: int64> are not read"),
        (pa.array([[1.0, 2.0]] * (ROWS - 1) + [[1.0]]), "holds lists of 1, 2 values"),
    ],
)
def test_unusable_list_columns_are_one_line_exit_2(cli, lists, column, message):
    root, t = lists
    pq.write_table(t.append_column("odd", column), root / "train.parquet")
    out = root / "x.safetensors"
    r = init(cli, root, out)
    assert r.exit_code == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not out.exists()


def test_a_vector_of_another_length_or_with_nan_at_train(cli, lists):
    root, t = lists
    out = root / "init.safetensors"
    assert init(cli, root, out).exit_code == 0
    vec = t.column("emb").to_pylist()
    short = t.set_column(2, "emb", pa.array([[1.0, 2.0], *vec[1:]], pa.list_(pa.float32())))
    pq.write_table(short, root / "short.parquet")
    r = cli("train", "--checkpoint", out, "--data", root / "short.parquet", "--out", root / "r1", "--max-steps", 1)
    assert r.exit_code == 2 and "vector column 'emb' holds 3 values per row" in r.stderr and "row 0: 2" in r.stderr
    nan = t.set_column(2, "emb", pa.array([[float("nan"), 0.0, 0.0], *vec[1:]], pa.list_(pa.float32(), 3)))
    pq.write_table(nan, root / "nan.parquet")
    r = cli("train", "--checkpoint", out, "--data", root / "nan.parquet", "--out", root / "r2", "--max-steps", 1)
    assert r.exit_code == 2 and "'emb' 1" in r.stderr
    r = cli(
        *("train", "--checkpoint", out, "--data", root / "nan.parquet", "--out", root / "r3", "--max-steps", 1),
        *("--on-invalid-rows", "drop", "--json"),
    )
    assert r.exit_code == 0, r.output
    assert "column 'emb' 1 NaN" in r.stderr
    assert json.loads(r.stdout)["data"]["train"]["rows_dropped"] == 1
