"""Transference measured with row-sparse embedding tables (``measure-transference --embeddings
coordinate``, ``train --measure-every`` with ``--embeddings coordinate``) against the dense path.

The dense path (every table row a column of the K×P matrix, the lookahead over the whole flat
vector) is the oracle: Z, Z_rel, the losses, cosine, conflict, GMS and the gradient norms, per
batch, whole model and per module, for ``--lookahead sgd`` and ``optimizer``.

Tolerance. Both paths take the same float32 lookahead on the same weights; they differ only in how
a table row's gradient sums its lookups (dense embedding backward against ``TableRows.add``'s
``index_add_``), i.e. in float32 rounding of the gradient (a few ulp, ~1e-7 relative). That
reaches the lookahead losses as a change of order α·|∇L|·1e-7 and float32 rounding of a mean loss
(~6e-8 relative), so Z_rel = 1 − L'/L and the cosines may differ by a few 1e-7: ``TOL32`` = 2e-6
absolute (on values of order 0.01–1), an order above that and far below any difference that matters
(the smallest Z_rel the sample's entries show is ~1e-3). In float64 the same comparison holds to
1e-12, which shows the float32 differences are rounding only.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl import measurement, models, sample, tables
from cogradctl import transference as tr
from cogradctl.cli import app
from cogradctl.console import Log
from cogradctl.stream import ParquetStream
from cogradctl.train import TrainConfig, train
from tests.test_embeddings import TwoTables as Tables

TASKS = ["click", "like", "share"]
TOL32, TOL64 = 2e-6, 1e-12
KEYS = (*tr.MATRICES, *tr.PER_BATCH_EXTRA)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings_measure")
    sample.write(sample.generate(600, seed=5), root / "train.parquet")
    schema, _ = data_io.infer_schema(str(root / "train.parquet"), TASKS, dict.fromkeys(TASKS, "binary"))
    return {"root": root, "schema": schema, "data": data_io.load(str(root / "train.parquet"), schema)}


def pair(schema, dtype):
    """The same model twice: dense (the oracle) and with its tables row-sparse."""
    torch.manual_seed(1)
    dense = Tables(schema).to(dtype)
    sparse = copy.deepcopy(dense)
    d_split = models.split_parameters(dense, TASKS)
    s_split = models.split_parameters(sparse, TASKS)
    tables.separate(sparse, s_split, "coordinate")
    return dense, d_split, sparse, s_split


def agree(dense: list[dict], sparse: list[dict], tol: float) -> None:
    """Every per-batch quantity, whole model and per module, equal within ``tol``; the conflict flag
    equal wherever the cosine is clear of 0 by more than ``tol``."""
    assert len(dense) == len(sparse) > 0
    for a, b in zip(dense, sparse):
        pairs = [(a, b)] + [(a["modules"][m], b["modules"][m]) for m in a.get("modules", {})]
        assert set(a.get("modules", {})) == set(b.get("modules", {}))
        for x, y in pairs:
            for key in KEYS:
                if key == "conflict_rate":
                    clear = np.abs(x["cosine"]) > tol
                    np.testing.assert_array_equal(x[key][clear], y[key][clear])
                else:
                    np.testing.assert_allclose(y[key], x[key], rtol=0, atol=tol, err_msg=key)
            assert np.abs(x["transference_rel"]).max() > 100 * tol  # the comparison resolves something


def saved_adam(split, steps=(7.0, 3.0)):
    """Adam state as ``train`` saves it, by parameter name: v > 0 with the tables' rows 1 and 2 at
    v = 0 (never trained, yet looked up: their step is the bound), a nonzero momentum (which the
    lookahead must not use), step 7 for the dense parameters and 3 for the tables (lazy: one count
    per table)."""
    gen = torch.Generator().manual_seed(3)
    extra = {}
    for name, p in zip(split.shared_names, split.shared):
        is_table = name in ("table.weight", "bag.weight")
        v = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 1e-3
        if is_table:
            v[1:3] = 0
        extra[f"optim.exp_avg_sq.{name}"] = v
        extra[f"optim.exp_avg.{name}"] = torch.randn(p.shape, generator=gen)
        extra[f"optim.step.{name}"] = torch.tensor(steps[is_table])
    history = [{"optimizer": {"name": "adam", "lr": 0.05, "betas": [0.9, 0.999], "eps": 1e-8}}]
    return extra, history


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
def test_sgd_lookahead_by_module_equals_dense_and_leaves_the_tables_as_they_were(world, dtype, tol):
    dense, d_split, sparse, s_split = pair(world["schema"], dtype)
    groups = tr.shared_groups(dense, d_split)
    assert tr.shared_groups(sparse, s_split) == groups  # a table is its own group, as on the dense path
    assert {"table", "bag"} <= set(groups)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    args = (world["schema"], world["data"], 3, 100, 0.5)
    d_res, d_pb = tr.measure_full(dense, d_split, *args, groups=groups)
    s_res, s_pb = tr.measure_full(sparse, s_split, *args, groups=groups)
    agree(d_pb, s_pb, tol)
    assert s_res["modules"]["table"]["size"] == d_res["modules"]["table"]["size"] == 40 * 3
    # the touched rows were moved and put back exactly; no lookup recorder left on the modules
    assert all(torch.equal(before[k], v) for k, v in sparse.state_dict().items())
    assert not sparse.table._forward_pre_hooks and not sparse.bag._forward_pre_hooks


def test_holdout_equals_dense(world):
    dense, d_split, sparse, s_split = pair(world["schema"], torch.float32)
    args = (world["schema"], world["data"], 2, 150, 0.3)
    agree(
        tr.measure_full(dense, d_split, *args, holdout=True)[1],
        tr.measure_full(sparse, s_split, *args, holdout=True)[1],
        TOL32,
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
def test_optimizer_lookahead_equals_dense_untouched_rows_stay_put(world, dtype, tol):
    dense, d_split, sparse, s_split = pair(world["schema"], dtype)
    extra, history = saved_adam(d_split)
    d_state, lr, d_info = tr.adam_preconditioner(extra, history, d_split, "dense")
    s_state, _, s_info = tr.adam_preconditioner(extra, history, s_split, "sparse")
    assert isinstance(s_state, tr.RowAdam)
    assert s_info == d_info and d_info["untrained_entries"] == 2 * 3 + 2 * 2
    groups = tr.shared_groups(dense, d_split)
    args = (world["schema"], world["data"], 3, 100, lr)
    d_res, d_pb = tr.measure_full(dense, d_split, *args, precond=d_state, groups=groups, lookahead="optimizer")
    s_res, s_pb = tr.measure_full(sparse, s_split, *args, precond=s_state, groups=groups, lookahead="optimizer")
    agree(d_pb, s_pb, tol)
    # the same v = 0 entries moved (positions in the dense path's flat vector): rows 1 and 2 of
    # `table` (ids % 8 reaches them) and of `bag` (reached only by values 1 and 2 mod 30)
    for a, b in zip(d_pb, s_pb):
        np.testing.assert_array_equal(np.sort(a["untrained_moved"]), np.sort(b["untrained_moved"]))
    assert s_res["untrained_entries_moved"] == d_res["untrained_entries_moved"] > 0
    # On the dense path a row no lookup touched has a zero step (no momentum in the lookahead):
    # dense Adam's m̂ would move it, a lazily trained table's row must not move; neither path moves it.
    inputs, labels = world["data"].batch(slice(0, 100))
    grads = tr.SharedGradients(dense, d_split, world["schema"])
    _, g, _ = grads(inputs, labels.to(dtype))
    step = d_state.direction(g)
    start = 0  # the table's columns: the shared parameters in model order, the table first
    assert d_split.shared_names[0] == "table.weight"
    table_step = step[:, start : start + 40 * 3].reshape(3, 40, 3)
    ids = inputs["categorical"] % 8
    touched = torch.zeros(40, dtype=torch.bool)
    touched[torch.cat([ids.reshape(-1), ((ids * 7 + 3) % 40).reshape(-1)])] = True
    touched[0] = False  # the padding row: zero gradient
    assert (~touched).sum() > 20
    assert torch.count_nonzero(table_step[:, ~touched]) == 0 and torch.count_nonzero(table_step[:, touched]) > 0


def test_train_measure_every_with_coordinate_tables_and_its_checkpoint(world, tmp_path):
    """train --embeddings coordinate --measure-every runs, trains exactly as without it, and its
    records equal the dense measurement of the same weights on the same rows; its checkpoint (lazy
    Adam state) measures as on the dense path."""
    torch.manual_seed(0)
    net, config = models.build("mmoe", world["schema"], {"num_experts": 2, "expert": [8], "tower": [4]})
    init = tmp_path / "init.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, world["schema"], net.state_dict(), []), init)
    path = str(world["root"] / "train.parquet")
    cfg = TrainConfig(
        checkpoint=str(init),
        data=path,
        out=str(tmp_path / "run"),
        lr=1e-2,
        batch_size=64,
        max_steps=4,
        seed=2,
        measure_every=2,
        embeddings="coordinate",
    )
    train(cfg, Log(quiet=True))
    train(dataclasses.replace(cfg, out=str(tmp_path / "plain"), measure_every=None), Log(quiet=True))
    # measuring moved the tables' touched rows and put them back: the same weights as without it
    with_measuring = ckpt_io.load(tmp_path / "run" / "last.safetensors").state
    plain = ckpt_io.load(tmp_path / "plain" / "last.safetensors").state
    assert with_measuring.keys() == plain.keys()
    assert all(torch.equal(with_measuring[k], plain[k]) for k in plain)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "transference" in r]
    assert [r["step"] for r in measured] == [2, 4]
    last = tmp_path / "run" / "last.safetensors"
    ckpt, model, split = models.from_checkpoint(last)
    assert tables.embedding_tables(model, split)  # measured dense below: the oracle
    stream = ParquetStream(path, world["schema"])
    rows = stream.rows(tr.pick_batches(stream.num_rows, 4, 64, cfg.seed))
    oracle = tr.measure(model, split, world["schema"], rows, 4, 64, seed=cfg.seed)
    for key in tr.MATRICES:
        np.testing.assert_allclose(measured[-1]["transference"][key], oracle[key], rtol=0, atol=TOL32, err_msg=key)

    # the checkpoint, as measure-transference takes it: sgd and the lazily trained Adam state, by module
    results = {}
    for mode in ("dense", "coordinate"):
        for lookahead, alpha in (("sgd", 2.0), ("optimizer", 0.2)):  # steps whose every module's Z_rel resolves
            ckpt, model, split = models.from_checkpoint(last)
            options = measurement.Options(3, 100, lookahead, alpha, by_module=True, embeddings=mode)
            assert measurement.take_tables(model, split, options) == mode
            assert bool(split.tables) == (mode == "coordinate")
            precond, step, _ = measurement.lookahead_step(ckpt, split, options, last)
            results[mode, lookahead] = measurement.measure(
                ckpt, model, split, world["data"], precond, step, options, "cpu"
            )
    for lookahead in ("sgd", "optimizer"):
        agree(results["dense", lookahead][1], results["coordinate", lookahead][1], TOL32)


def test_cli_embeddings_option(world, tmp_path):
    torch.manual_seed(0)
    net, config = models.build("mmoe", world["schema"], {"num_experts": 2, "expert": [8], "tower": [4]})
    ckpt = tmp_path / "init.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, world["schema"], net.state_dict(), []), ckpt)
    args = ["measure-transference", "--checkpoint", str(ckpt), "--data", str(world["root"] / "train.parquet")]
    args += ["--batches", "2", "--batch-size", "100", "--json", "--by-module"]
    runner = CliRunner()
    out = {}
    for mode in ("auto", "coordinate", "dense"):
        result = runner.invoke(app, [*args, "--embeddings", mode])
        assert result.exit_code == 0, result.stderr
        out[mode] = json.loads(result.stdout)
    assert out["auto"]["embeddings"] == "dense"  # a small model's tables: dense, as train --embeddings auto
    assert out["coordinate"]["embeddings"] == "coordinate"
    assert "measured row-sparse" in runner.invoke(app, [*args, "--embeddings", "coordinate"]).stderr
    for key in tr.MATRICES:
        np.testing.assert_allclose(out["coordinate"][key], out["dense"][key], rtol=0, atol=TOL32, err_msg=key)
        for group in out["dense"]["modules"]:
            a, b = out["dense"]["modules"][group], out["coordinate"]["modules"][group]
            assert a["size"] == b["size"] and a["parameters"] == b["parameters"]
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=TOL32, err_msg=f"{group} {key}")
    # a baseline is measured the same way; the checkpoint against itself on the same batches: no change
    same = runner.invoke(app, [*args, "--embeddings", "coordinate", "--baseline", str(ckpt)])
    assert same.exit_code == 0, same.stderr
    doc = json.loads(same.stdout)
    assert doc["baseline"]["embeddings"] == "coordinate"
    assert np.array_equal(doc["baseline"]["transference_rel"], doc["transference_rel"])
    bad = runner.invoke(app, [*args, "--embeddings", "sum"])
    assert (
        bad.exit_code == 2 and "--embeddings 'sum'" in bad.stderr and "expected auto, coordinate, dense" in bad.stderr
    )
