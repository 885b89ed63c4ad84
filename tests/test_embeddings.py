"""Row-sparse embedding tables (``train --embeddings``, cogradctl/tables.py) against the dense path.

The dense path (every table row a column of the K×P matrix, dense optimizers) is the oracle for the
gradients, the methods' updates and one training step; lazy Adam/SGD against a float64 hand loop.
"""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl import models, sample, tables
from cogradctl.errors import UsageError
from cogradctl.methods import get_method
from cogradctl.taskgrad import TaskGradients
from cogradctl.train import TrainConfig, make_optimizer, train_step
from cogradctl.train.optim import lazy_step, trainable
from tests.runs import wait_for_step

TASKS = ["click", "like", "share"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    sample.write(sample.generate(600, seed=5), root / "train.parquet")
    schema, _ = data_io.infer_schema(str(root / "train.parquet"), TASKS, dict.fromkeys(TASKS, "binary"))
    torch.manual_seed(0)
    net, config = models.build("mmoe", schema, {"num_experts": 2, "expert": [8], "tower": [4]})
    path = root / "init.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, schema, net.state_dict(), []), path)
    return {"schema": schema, "ckpt": path, "data": data_io.load(str(root / "train.parquet"), schema)}


class TwoTables(nn.Module):
    """A model with an Embedding (padding_idx 0, looked up twice per forward) and an EmbeddingBag,
    both shared, a shared linear layer and one linear head per task."""

    def __init__(self, schema):
        super().__init__()
        c = len(schema.categorical)
        self.table = nn.Embedding(40, 3, padding_idx=0)
        self.bag = nn.EmbeddingBag(30, 2, mode="sum")
        self.shared = nn.Linear(2 * c * 3 + 2 + len(schema.dense), 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def forward(self, batch):
        ids = batch["categorical"] % 8  # 0 (the padding row) among them
        x = torch.cat(
            [
                self.table(ids).flatten(1),
                self.table((ids * 7 + 3) % 40).flatten(1),  # a second lookup of the same table
                self.bag(batch["categorical"] % 30),
                batch["dense"].to(self.shared.weight.dtype),
            ],
            dim=1,
        )
        h = torch.tanh(self.shared(x))
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}

    def task_parameters(self):
        return {t: [f"heads.{t}.weight", f"heads.{t}.bias"] for t in TASKS}


def mmoe(world):
    _, model, _ = models.from_checkpoint(world["ckpt"])
    return model.double()


def two_tables(world):
    torch.manual_seed(1)
    model = TwoTables(world["schema"]).double()
    with torch.no_grad():
        model.table.weight.normal_()  # the padding row too: its gradient must still be zero
    return model


def pair(world, build, mode="coordinate"):
    """The same model twice: dense (oracle) and with its tables separated."""
    dense = build(world)
    sparse = copy.deepcopy(dense)
    d_split = models.split_parameters(dense, TASKS)
    s_split = models.split_parameters(sparse, TASKS)
    tables.separate(sparse, s_split, mode)
    return dense, d_split, sparse, s_split


def batch(world, rows=12):
    inputs, labels = world["data"].batch(slice(0, rows))
    return inputs, labels.double()


def columns(split):
    """{shared parameter name: its column slice in the dense matrix}."""
    out, start = {}, 0
    for name, p in zip(split.shared_names, split.shared):
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def sparse_from_dense(vector, d_split, s_split, grads):
    """A dense-path P-vector (or K×P matrix) cut as the sparse path lays out its columns (the
    parameters in the same order, each table as its touched rows only); and the untouched rows."""
    cols = columns(d_split)
    v = vector if vector.dim() == 2 else vector[None]
    pieces, rest = [], []
    for name, param in zip(d_split.shared_names, d_split.shared):
        if name not in s_split.table_names:
            pieces.append(v[:, cols[name]])
            continue
        index = grads.tables.index[s_split.table_names.index(name)]
        block = v[:, cols[name]].reshape(v.shape[0], *param.shape)
        pieces.append(block[:, index].reshape(v.shape[0], -1))
        untouched = torch.ones(param.shape[0], dtype=torch.bool)
        untouched[index] = False
        rest.append(block[:, untouched])
    out = torch.cat(pieces, dim=1)
    return (out if vector.dim() == 2 else out[0]), rest


@pytest.mark.parametrize("build", [mmoe, two_tables])
def test_touched_rows_hold_the_dense_gradient_and_the_rest_is_zero(world, build):
    dense, d_split, sparse, s_split = pair(world, build)
    assert s_split.tables and all(isinstance(p, nn.Parameter) for p in s_split.tables)
    inputs, labels = batch(world)
    losses_d, g_d, _ = TaskGradients(dense, d_split, world["schema"])(inputs, labels)
    grads = TaskGradients(sparse, s_split, world["schema"])
    losses_s, g_s, _ = grads(inputs, labels)
    want, rest = sparse_from_dense(g_d, d_split, s_split, grads)
    assert g_s.shape == want.shape and g_s.shape[1] < g_d.shape[1]
    torch.testing.assert_close(g_s, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(losses_s, losses_d, rtol=0, atol=0)
    for block in rest:
        assert block.numel() and torch.count_nonzero(block) == 0
    if build is two_tables:  # the padding row was looked up but is not a touched row
        assert 0 not in grads.tables.index[0].tolist()
        assert bool((inputs["categorical"] % 8 == 0).any())
    assert sum(grads.segments) == g_s.shape[1]


METHODS = [
    ("ew", {}),
    ("cograd", {}),
    ("cograd", {"normalize": "curvature"}),
    ("cograd", {"hessian": "outer"}),
    ("mgda", {}),
    ("pcgrad", {}),
    ("pcgrad", {"granularity": "tensor"}),
    ("gdod", {}),
    ("cagrad", {}),
    ("imtl-g", {}),
    ("aligned-mtl", {}),
]


@pytest.mark.parametrize(("name", "options"), METHODS, ids=[f"{n}{o or ''}" for n, o in METHODS])
def test_the_method_update_on_touched_rows_equals_the_dense_paths(world, name, options):
    dense, d_split, sparse, s_split = pair(world, two_tables)
    inputs, labels = batch(world)
    losses, g_d, _ = TaskGradients(dense, d_split, world["schema"])(inputs, labels)
    grads = TaskGradients(sparse, s_split, world["schema"])
    _, g_s, _ = grads(inputs, labels)
    m_d, m_s = get_method(name, **options), get_method(name, **options)
    m_d.setup(3)
    m_d.segments = [p.numel() for p in d_split.shared]
    m_s.setup(3)
    for _ in range(2):  # twice: state carried from one step to the next (pcgrad's generator)
        update_d = m_d(g_d, losses).double()
        update_s = m_s(grads.coordinated(g_s, m_s), losses).double()
        want, rest = sparse_from_dense(update_d, d_split, s_split, grads)
        torch.testing.assert_close(update_s, want, rtol=1e-9, atol=1e-12)
        for block in rest:
            assert torch.count_nonzero(block) == 0


def sgd_config(**kw):
    return TrainConfig(checkpoint="", data="", out="", **{"optimizer": "sgd", "momentum": 0.0, "lr": 0.5, **kw})


def step(model, split, world, cfg, method, inputs, labels, sum_tables=False, steps=1, clip=None):
    m = get_method(method)
    m.setup(3)
    m.segments = [p.numel() for p in split.shared]
    params, names = trainable(model, split, m)
    optimizer = make_optimizer(cfg, params, tables=len(split.tables))
    grads = TaskGradients(model, split, world["schema"], sum_tables=sum_tables)
    for _ in range(steps):
        train_step(grads, m, optimizer, inputs, labels, grad_clip=clip)
    return optimizer, names


@pytest.mark.parametrize("method", ["cograd", "mgda"])
def test_one_training_step_equals_the_dense_path(world, method):
    """SGD, and Adam's first step (zero moments: an untouched row does not move on either path);
    with gradient clipping, which sees the same norm on both."""
    inputs, labels = batch(world)
    for cfg, clip in ((sgd_config(), None), (sgd_config(optimizer="adam", lr=0.05), 0.01)):
        dense, d_split, sparse, s_split = pair(world, two_tables)
        before = copy.deepcopy(sparse.state_dict())
        step(dense, d_split, world, cfg, method, inputs, labels, clip=clip)
        step(sparse, s_split, world, cfg, method, inputs, labels, clip=clip)
        for name, value in dense.state_dict().items():
            torch.testing.assert_close(sparse.state_dict()[name], value, rtol=1e-9, atol=1e-12)
        assert not torch.equal(sparse.bag.weight, before["bag.weight"])


def test_sum_mode_gives_tables_the_sum_and_the_method_the_dense_layers(world):
    dense, d_split, sparse, s_split = pair(world, two_tables, "sum")
    inputs, labels = batch(world)
    losses, g_d, _ = TaskGradients(dense, d_split, world["schema"])(inputs, labels)
    cols = columns(d_split)
    before = copy.deepcopy(sparse.state_dict())
    step(sparse, s_split, world, sgd_config(), "mgda", inputs, labels, sum_tables=True)
    m = get_method("mgda")
    own = torch.cat([g_d[:, cols[n]] for n in s_split.shared_names], dim=1)
    update = m(own, losses)
    offset = 0
    for name, p in zip(s_split.shared_names, s_split.shared):  # the method on the dense layers
        want = before[name] - 0.5 * update[offset : offset + p.numel()].view_as(p)
        torch.testing.assert_close(sparse.state_dict()[name], want, rtol=1e-9, atol=1e-12)
        offset += p.numel()
    for name in s_split.table_names:  # every row, touched or not: minus lr × Σ_i g_i
        want = before[name] - 0.5 * g_d[:, cols[name]].sum(dim=0).view_as(before[name])
        torch.testing.assert_close(sparse.state_dict()[name], want, rtol=1e-9, atol=1e-12)


def test_freeze_keeps_the_tables_and_trains_the_rest(world):
    _, _, model, split = pair(world, two_tables, "freeze")
    assert not split.tables and "table.weight" not in split.shared_names
    before = copy.deepcopy(model.state_dict())
    inputs, labels = batch(world)
    optimizer, names = step(model, split, world, sgd_config(), "cograd", inputs, labels)
    assert "table.weight" not in names and "bag.weight" not in names
    after = model.state_dict()
    assert torch.equal(after["table.weight"], before["table.weight"])
    assert torch.equal(after["bag.weight"], before["bag.weight"])
    assert not torch.equal(after["shared.weight"], before["shared.weight"])


def lazy_oracle(table, updates, kind, lr, wd, betas=(0.9, 0.999), eps=1e-8, momentum=0.9):
    """Lazy Adam/AdamW/SGD by hand, row by row, in float64 Python numbers."""
    w = [list(map(float, row)) for row in table.tolist()]
    m = [[0.0] * len(r) for r in w]
    v = [[0.0] * len(r) for r in w]
    for t, (rows, grad) in enumerate(updates, start=1):
        for row, g_row in zip(rows.tolist(), grad.tolist()):
            for j, g in enumerate(g_row):
                if kind == "sgd":
                    d = g + wd * w[row][j]
                    m[row][j] = momentum * m[row][j] + d
                    w[row][j] -= lr * m[row][j]
                    continue
                if kind == "adam":
                    g = g + wd * w[row][j]
                else:
                    w[row][j] *= 1 - lr * wd
                m[row][j] = betas[0] * m[row][j] + (1 - betas[0]) * g
                v[row][j] = betas[1] * v[row][j] + (1 - betas[1]) * g * g
                m_hat, v_hat = m[row][j] / (1 - betas[0] ** t), v[row][j] / (1 - betas[1] ** t)
                w[row][j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize(("kind", "wd"), [("adam", 0.0), ("adam", 0.1), ("adamw", 0.1), ("sgd", 0.05)])
def test_lazy_step_is_the_optimizer_on_the_touched_rows_only(kind, wd):
    gen = torch.Generator().manual_seed(3)
    table = nn.Parameter(torch.randn(10, 3, dtype=torch.float64, generator=gen))
    start = table.detach().clone()
    optimizer = make_optimizer(
        TrainConfig(checkpoint="", data="", out="", optimizer=kind, lr=0.1, weight_decay=wd), [table], tables=1
    )
    updates = []
    for rows in ([1, 4, 7], [4, 5], [0, 1, 9], [4]):
        index = torch.tensor(rows)
        grad = torch.randn(len(rows), 3, dtype=torch.float64, generator=gen)
        updates.append((index, grad))
        table.grad = torch.sparse_coo_tensor(index[None], grad, table.shape, is_coalesced=True, check_invariants=False)
        lazy_step(optimizer, optimizer.param_groups[-1])
        assert table.grad is None
    want = lazy_oracle(start, updates, kind, 0.1, wd)
    torch.testing.assert_close(table.detach(), want, rtol=1e-12, atol=1e-14)
    for never in (2, 3, 6, 8):  # rows no batch touched: not moved, not decayed
        assert torch.equal(table.detach()[never], start[never])
    if kind != "sgd":
        assert float(optimizer.state[table]["step"]) == 4.0


def test_check_mode_refuses_what_row_sparse_tables_cannot_do_yet():
    ew, exact, fisher = (
        get_method("ew"),
        get_method("cograd", hessian="exact"),
        get_method("cograd", hessian="fisher-ema"),
    )
    tables.check_mode("coordinate", ew)
    with pytest.raises(UsageError, match="Hessian-vector"):
        tables.check_mode("sum", exact)
    with pytest.raises(UsageError, match="fisher-ema"):
        tables.check_mode("coordinate", fisher)
    tables.check_mode("sum", fisher)  # the dense layers' columns do not change
    for mode in ("dense", "freeze"):
        tables.check_mode(mode, exact)


# ---------------------------------------------------------------------------- the train command

ROOT = Path(__file__).resolve().parents[1]


def train_args(ckpt, sample_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "cogradctl",
        "train",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(sample_dir / "train.parquet"),
        "--method",
        "cograd",
        "--optimizer",
        "adamw",
        "--weight-decay",
        "0.01",
        "--batch-size",
        "64",
        "--save-every",
        "3",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def saved(out: Path):
    try:
        return ckpt_io.load(out / "last.safetensors")
    except Exception:
        return None


def test_sigkill_then_rerun_is_bit_identical_with_row_sparse_tables(base_checkpoint, sample_dir, tmp_path, cli):
    """The lazy optimizer's table state is saved (optim.<key>.<table>) and restored exactly."""
    reference = tmp_path / "reference"
    args = ("--embeddings", "coordinate")
    assert cli(*train_args(base_checkpoint, sample_dir, reference, *args)[3:]).exit_code == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_args(base_checkpoint, sample_dir, out, *args), cwd=ROOT)
    wait_for_step(proc, out, 6)
    proc.kill()
    proc.wait()
    killed_at = saved(out).training_state["step"]
    assert 6 <= killed_at < 32
    subprocess.run(train_args(base_checkpoint, sample_dir, out, *args), check=True, cwd=ROOT, timeout=600)
    want, got = saved(reference), saved(out)
    assert got.training_state["finished"] and got.training_state["step"] == 32
    for name in want.state:
        assert torch.equal(want.state[name], got.state[name]), name
    table = "input.embedding.weight"
    assert want.training_state["config"]["embeddings"] == "coordinate"
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(want.extra[f"optim.{key}.{table}"], got.extra[f"optim.{key}.{table}"])
    # lazy: rows no batch ever touched kept their initial weights and zero moments
    start = ckpt_io.load(base_checkpoint).state[table]
    never = (want.extra[f"optim.exp_avg_sq.{table}"] == 0).all(dim=1)
    assert torch.equal(want.state[table][never], start[never])


def test_the_mode_is_validated_stored_and_fixed_for_the_run(base_checkpoint, sample_dir, tmp_path, cli):
    out = tmp_path / "run"
    common = ["train", "--checkpoint", str(base_checkpoint), "--data", str(sample_dir / "train.parquet")]
    common += ["--out", str(out), "--batch-size", "256", "--device", "cpu", "--max-steps", "2", "-q"]
    result = cli(*common, "--embeddings", "rows")
    assert result.exit_code == 2 and "--embeddings 'rows'" in result.stderr and not out.exists()
    result = cli(*common, "--embeddings", "coordinate", "--method", "cograd", "-o", "hessian=fisher-ema")
    assert result.exit_code == 2 and "fisher-ema" in result.stderr and not out.exists()
    assert cli(*common).exit_code == 0  # auto: the sample's small table stays dense
    assert 'embeddings = "dense"' in (out / "config.toml").read_text()
    assert "optim.exp_avg.input.embedding.weight" in saved(out).extra  # the dense path's Adam state
    assert cli(*common, "--embeddings", "sum", "--overwrite").exit_code == 0
    state = saved(out)
    state.training_state["finished"] = False  # an unfinished run, rerun with another mode: refused
    ckpt_io.save(state, out / "last.safetensors")
    result = cli(*common, "--embeddings", "coordinate")
    assert result.exit_code == 2 and "embeddings ('sum' → 'coordinate')" in result.stderr
    result = cli(*common)  # auto resolves to dense here: a change too
    assert result.exit_code == 2 and "embeddings ('sum' → 'dense')" in result.stderr


def test_auto_is_coordinate_from_the_threshold_on(world, monkeypatch):
    model = mmoe(world)
    split = models.split_parameters(model, TASKS)
    numbers = model.input.embedding.weight.numel()
    monkeypatch.setattr(tables, "AUTO_ELEMENTS", numbers + 1)
    assert tables.resolve("auto", model, split) == "dense"
    monkeypatch.setattr(tables, "AUTO_ELEMENTS", numbers)
    assert tables.resolve("auto", model, split) == "coordinate"
    assert tables.resolve("freeze", model, split) == "freeze"
