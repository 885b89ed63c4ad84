"""Training and measuring on partial labels and weights (issue #23, items 3 and 4): a step where a
task has no observed row, every method on a CTR/CVR data set, the distributed reduction against one
process with the global batch (tests/test_distributed.py), the transference against a hand-rolled float64 masked computation,
and the CLI proof (sample-data --kind ctr-cvr → init → train → evaluate → measure-transference)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.func import functional_call

from cogradctl import checkpoint as ckpt_io
from cogradctl import data, sample
from cogradctl import transference as tr
from cogradctl.labels import LabelOptions
from cogradctl.methods import get_method, list_methods
from cogradctl.methods.base import Method
from cogradctl.models import build, split_parameters
from cogradctl.taskgrad import TaskGradients
from cogradctl.train import train_step
from cogradctl.train.logs import step_record

TINY = ["--config", "num_experts=2", "--config", "expert=[16]", "--config", "tower=[8]"]
WEIGHTED = LabelOptions(weight="weight")


@pytest.fixture(scope="module")
def ctr(tmp_path_factory, cli):
    """128 rows of the ctr-cvr sample data in row groups of 32, the first 32 without a click (so
    without a purchase label): an unshuffled batch of them has no observed purchase. A tiny MMoE
    checkpoint made by init, the weight column left out of the features."""
    root = tmp_path_factory.mktemp("ctrtrain")
    t = sample.generate_ctr_cvr(128, seed=7)
    click = t.column("click").to_numpy().copy()
    click[:32] = 0
    purchase = t.column("purchase").to_numpy(zero_copy_only=False)
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click, pa.int8()))
    t = t.set_column(
        t.schema.get_field_index("purchase"), "purchase", pa.array(purchase, mask=click == 0, type=pa.int8())
    )
    pq.write_table(t, root / "train.parquet", row_group_size=32)
    out = root / "base.safetensors"
    r = cli(
        "init", "--model", "mmoe", *TINY, "--data", root / "train.parquet", "--tasks", "click,purchase",
        "--exclude-features", "weight", "--out", out, "--quiet",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return {"data": root / "train.parquet", "table": t, "checkpoint": out}


def _model(checkpoint):
    source = ckpt_io.load(checkpoint)
    model, _ = build(source.model, source.schema, source.model_config)
    ckpt_io.load_into(model, source.state, str(checkpoint))
    return source.schema, model, split_parameters(model, source.schema.task_names, source.model)


class _Recorder(Method):
    """ew that records the keyword arguments it was called with."""

    def forward(self, grads, losses=None, hvp=None, observed=None):
        self.seen = observed
        return grads.sum(dim=0)


def test_a_step_where_a_task_has_no_observed_row(ctr):
    schema, model, split = _model(ctr["checkpoint"])
    ds = data.load(str(ctr["data"]), schema, WEIGHTED)
    grads = TaskGradients(model, split, schema)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    own = {t: [p.detach().clone() for p in split.tasks[t]] for t in schema.task_names}
    method = _Recorder()
    losses, g = train_step(grads, method, opt, *ds.batch(slice(0, 32)))  # no purchase label in these rows
    k = schema.task_names.index("purchase")
    assert losses[k] == 0 and not g[k].any() and g[1 - k].any()
    assert method.seen.tolist() == [t != "purchase" for t in schema.task_names]
    record = step_record(1, 1, schema.task_names, losses, g, (grads.denominators > 0).tolist())
    assert record["loss"]["purchase"] is None and record["loss"]["click"] == pytest.approx(float(losses[1 - k]))
    assert record["cosine"] == {"|".join(schema.task_names): None}  # metrics.jsonl: null, not the step's 0
    assert all(torch.equal(p, q) for p, q in zip(split.tasks["purchase"], own["purchase"]))  # no gradient: unmoved
    assert not all(torch.equal(p, q) for p, q in zip(split.tasks["click"], own["click"]))
    # a batch where every task is observed: the method is called as before, without observed
    train_step(grads, method, opt, *ds.batch(slice(32, 128)))
    assert method.seen is None


@pytest.mark.parametrize("name", sorted(list_methods()))
def test_every_method_trains_on_partial_labels(ctr, name):
    """Four steps of 32 rows in file order: the first without a purchase label, the others with
    some; weighted rows. Finite losses and weights after each step."""
    schema, model, split = _model(ctr["checkpoint"])
    ds = data.load(str(ctr["data"]), schema, WEIGHTED)
    method = get_method(name, **({"weights": [1.0, 0.5]} if name == "weighted" else {}))
    method.setup(2)
    method.segments = [p.numel() for p in split.shared]
    opt = torch.optim.SGD([*model.parameters(), *method.parameters()], lr=0.05)
    grads = TaskGradients(model, split, schema)
    for start in range(0, 128, 32):
        losses, _ = train_step(grads, method, opt, *ds.batch(slice(start, start + 32)))
        assert torch.isfinite(losses).all()
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- transference


def _hand_loss(model, params, inputs, y, w, schema, task):
    """float64 masked weighted mean of one task's loss, from the model's outputs (None: no observed row)."""
    k = schema.task_names.index(task)
    out = functional_call(model, params, (inputs,))[task]
    seen = ~torch.isnan(y[:, k])
    wk = w[seen]
    if not bool(wk.sum() > 0):
        return None
    x, t = out[seen], y[seen, k]
    return (wk * (torch.nn.functional.softplus(x) - t * x)).sum() / wk.sum()


def test_measure_equals_a_hand_rolled_masked_computation(ctr):
    schema, model, split = _model(ctr["checkpoint"])
    ds = data.load(str(ctr["data"]), schema, WEIGHTED)
    alpha, size, batches = 0.1, 16, 8
    result, per_batch = tr.measure_full(model, split, schema, ds, batches, size, alpha, seed=0)
    hand = copy.deepcopy(model).double().eval()
    names = split.shared_names
    shared = dict(zip(names, (p for n, p in hand.named_parameters() if n in set(names))))
    shared = {n: dict(hand.named_parameters())[n] for n in names}
    z = np.full((batches, 2, 2), np.nan)
    cos = np.full((batches, 2, 2), np.nan)
    for b, (lo, hi) in enumerate(tr.pick_batches(len(ds), batches, size, 0)):
        inputs, labels = ds.batch(slice(lo, hi))
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        y, w = labels[:, :2].double(), labels[:, 2].double()
        base = dict(hand.named_parameters())
        before = [_hand_loss(hand, base, inputs, y, w, schema, t) for t in schema.task_names]
        g = [
            None
            if loss is None
            else torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, list(shared.values()))])
            for loss in before
        ]
        for i in range(2):
            if g[i] is None:
                continue
            at = 0
            moved = dict(base)
            for n, p in shared.items():
                moved[n] = p.detach() - alpha * g[i][at : at + p.numel()].view_as(p)
                at += p.numel()
            for j, task in enumerate(schema.task_names):
                if before[j] is not None:
                    z[b, i, j] = float((before[j] - _hand_loss(hand, moved, inputs, y, w, schema, task)).detach())
                if g[j] is not None:
                    cos[b, i, j] = float(g[i] @ g[j] / (g[i].norm() * g[j].norm()))
    assert np.isnan(z).any()  # some batches had no purchase label: those entries give no value
    used = (~np.isnan(z)).sum(axis=0)
    assert result["batches_used"]["transference"] == used.tolist()
    mean = np.nanmean(z, axis=0)
    got = np.array(result["transference"], dtype=float)
    assert np.allclose(got, mean, rtol=1e-3, atol=2e-6), (got, mean)
    for i in range(2):
        for j in range(2):
            if i != j:
                assert result["cosine"][i][j] == pytest.approx(np.nanmean(cos[:, i, j]), abs=1e-4)
    assert all(np.isnan(pb["transference"]).any() == np.isnan(z[b]).any() for b, pb in enumerate(per_batch))


# ---------------------------------------------------------------------------- the CLI proof


def test_cli_ctr_cvr_trains_evaluates_and_measures(cli, tmp_path):
    root = tmp_path / "ctr"
    r = cli("sample-data", "--kind", "ctr-cvr", "--out", root, "--rows", 512, "--valid-rows", 256)
    assert r.exit_code == 0, r.output
    ckpt = tmp_path / "base.safetensors"
    args = ["--data", root / "train.parquet", "--tasks", "click,purchase", "--exclude-features", "weight"]
    assert cli("init", "--model", "mmoe", *TINY, *args, "--out", ckpt, "--quiet").exit_code == 0
    weighted = ("--weight-column", "weight", "--device", "cpu")
    out = tmp_path / "run"
    r = cli(
        "train", "--checkpoint", ckpt, "--data", root / "train.parquet", "--valid", root / "valid.parquet",
        "--out", out, "--batch-size", 64, "--method", "pcgrad", *weighted, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    train = pq.read_table(root / "train.parquet")
    nulls = train.column("purchase").null_count
    assert f"purchase: {nulls} labels (of 512 rows read in epoch 1)" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["data"]["train"]["labels_masked"] == {"purchase": nulls}
    valid = pq.read_table(root / "valid.parquet")
    observed = len(valid) - valid.column("purchase").null_count
    assert doc["after"]["tasks"]["purchase"]["rows"] == observed
    assert doc["data"]["valid"]["labels_masked"] == {"purchase": len(valid) - observed}
    assert f"--valid {root / 'valid.parquet'}: null labels masked" in r.stderr
    # the purchase loss the run logs is the masked weighted mean of the model's outputs
    schema, model, split = _model(out / "last.safetensors")
    inputs, labels = data.load(str(root / "valid.parquet"), schema, WEIGHTED).batch(slice(None))
    losses, _, _ = TaskGradients(model.eval(), split, schema)(inputs, labels)
    x = model(inputs)["purchase"].double().detach().numpy()
    seen = valid.column("purchase").is_valid().to_numpy(zero_copy_only=False)
    y = valid.column("purchase").to_numpy(zero_copy_only=False)[seen].astype(np.float64)
    w = valid.column("weight").to_numpy()[seen].astype(np.float64)
    hand = (w * (np.logaddexp(0.0, x[seen]) - y * x[seen])).sum() / w.sum()
    assert float(losses[schema.task_names.index("purchase")]) == pytest.approx(hand, rel=1e-5)
    r = cli("evaluate", "--checkpoint", out / "last.safetensors", "--data", root / "valid.parquet", *weighted, "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["tasks"]["purchase"]["rows"] == observed and ev["tasks"]["click"]["rows"] == len(valid)
    assert ev["tasks"]["purchase"]["weight"] == pytest.approx(w.sum())
    assert ev["labels_masked"] == {"purchase": len(valid) - observed}
    r = cli(
        "measure-transference", "--checkpoint", out / "last.safetensors", "--data", root / "valid.parquet",
        "--batches", 6, "--batch-size", 8, *weighted, "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # strict JSON: no NaN anywhere


@pytest.mark.parametrize("weight", [-1.0, float("nan"), None])
def test_bad_weights_stop_train_before_anything_is_written(cli, ctr, tmp_path, weight):
    """A bad weight in a row group the first batch does not read (4 row groups of 300 rows, read
    in a seeded order): still found before the run writes anything."""
    t = sample.generate_ctr_cvr(1200, seed=8)
    first = int(np.random.default_rng([0, 1, 0x5EED]).permutation(4)[0])  # the stream's first unit
    bad = (first + 2) % 4
    w = t.column("weight").to_pylist()
    w[bad * 300 + 17] = weight
    t = t.set_column(t.schema.get_field_index("weight"), "weight", pa.array(w, pa.float64()))
    pq.write_table(t, tmp_path / "bad.parquet", row_group_size=300)
    out = tmp_path / "run"
    r = cli(
        "train", "--checkpoint", ctr["checkpoint"], "--data", tmp_path / "bad.parquet", "--out", out,
        "--weight-column", "weight", "--device", "cpu", "--batch-size", 64, "--shuffle-buffer", 64,
    )  # fmt: skip
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and f"bad.parquet (row group {bad}): weight column 'weight' has 1" in r.stderr
    assert not out.exists()
    r = cli("evaluate", "--checkpoint", ctr["checkpoint"], "--data", ctr["data"], "--weight-column", "nope")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no weight column 'nope'" in r.stderr
