"""Partial labels and row weights (issue #23, items 3 and 4): how they are read (--missing-labels
mask|drop|error, --weight-column), the masked and weighted losses against a float64 hand
computation and autograd, the weighted metrics against brute force over all pairs, and evaluate
on the observed rows only."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import data, metrics, sample
from cogradctl.errors import DataError, UsageError
from cogradctl.evaluate import evaluate
from cogradctl.labels import LabelOptions
from cogradctl.schema import Schema, Task
from cogradctl.stream import ParquetStream
from cogradctl.taskgrad import masked_losses

TASKS = ["click", "purchase"]


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    """600 rows of ``sample-data --kind ctr-cvr`` in row groups of 128, and its schema (the weight
    column left out of the features, as the README's init does)."""
    root = tmp_path_factory.mktemp("ctr")
    table = sample.generate_ctr_cvr(600, seed=5)
    pq.write_table(table, root / "train.parquet", row_group_size=128)
    schema, _ = data.infer_schema(str(root / "train.parquet"), TASKS, {t: "binary" for t in TASKS}, exclude=["weight"])
    return root / "train.parquet", table, schema


def _all(stream: ParquetStream) -> torch.Tensor:
    return torch.cat([y for _, y in stream.batches(100, shuffle=False)])


def test_the_sample_data_is_a_ctr_cvr_data_set(ctr):
    _, table, _ = ctr
    click = table.column("click").to_numpy()
    purchase = table.column("purchase")
    assert purchase.null_count == int((click == 0).sum()) > 0  # null exactly where there was no click
    assert pa.compute.all(pa.compute.is_valid(purchase.filter(pa.array(click == 1)))).as_py()
    assert set(table.column("weight").to_numpy().tolist()) <= set(sample.WEIGHT_VALUES)


def test_mask_drop_error_and_the_weight_column(ctr):
    path, table, schema = ctr
    null = ~table.column("purchase").is_valid().to_numpy(zero_copy_only=False)
    k = schema.task_names.index("purchase")
    # mask (the default): every row kept, NaN exactly where the label is null, counted per task
    s = ParquetStream(str(path), schema)
    y = _all(s)
    assert y.shape == (600, 2) and torch.equal(torch.isnan(y[:, k]), torch.from_numpy(null))
    assert not torch.isnan(y[:, 1 - k]).any() and s.stats["labels_masked"] == {"purchase": int(null.sum())}
    # the weight column: label column K, as stored
    s = ParquetStream(str(path), schema, label_options=LabelOptions(weight="weight"))
    y = _all(s)
    assert y.shape == (600, 3) and torch.equal(y[:, 2], torch.from_numpy(table.column("weight").to_numpy().copy()))
    # the in-memory reader gives the same matrix
    mem = data.load(str(path), schema, LabelOptions(weight="weight"))
    assert torch.allclose(mem.labels, y, equal_nan=True) and torch.equal(torch.isnan(mem.labels), torch.isnan(y))
    # drop: the rows with a null label go, counted, whatever --on-invalid-rows says
    s = ParquetStream(str(path), schema, label_options=LabelOptions("drop"))
    y = _all(s)
    assert len(y) == 600 - null.sum() and not torch.isnan(y).any() and s.stats["rows_dropped"] == null.sum()
    with pytest.warns(UserWarning, match=f"dropped {int(null.sum())} row"):
        assert len(data.load(str(path), schema, LabelOptions("drop"))) == 600 - null.sum()
    # error: the former behaviour, an invalid row (dropped with --on-invalid-rows drop)
    with pytest.raises(DataError, match=r"invalid row\(s\) .*null labels \(--missing-labels error\).*'purchase'"):
        _all(ParquetStream(str(path), schema, label_options=LabelOptions("error")))
    s = ParquetStream(str(path), schema, on_invalid="drop", label_options=LabelOptions("error"))
    assert len(_all(s)) == 600 - null.sum()
    with pytest.raises(DataError, match="missing \\(null\\) label"):
        data.load(str(path), schema, LabelOptions("error"))


def test_a_stored_nan_label_is_still_invalid_and_predict_needs_no_weight_column(ctr, tmp_path):
    _, table, schema = ctr
    at = table.schema.get_field_index("click")
    click = table.column("click").to_numpy().astype(np.float64)
    click[7] = np.nan
    bad = table.set_column(at, "click", pa.array(click)).drop_columns(["weight"])
    pq.write_table(bad, tmp_path / "nan.parquet")
    with pytest.raises(DataError, match=r"1 invalid row\(s\) \(NaN or infinite values: task column 'click' 1\)"):
        _all(ParquetStream(str(tmp_path / "nan.parquet"), schema))
    with pytest.raises(DataError, match="use null for a missing label"):
        data.load(str(tmp_path / "nan.parquet"), schema)
    # prediction reads no labels: neither the NaN nor the missing weight column matters
    s = ParquetStream(str(tmp_path / "nan.parquet"), schema, labels=False, label_options=LabelOptions(weight="w"))
    assert sum(len(y) for _, y in s.batches(256, shuffle=False)) == 600


@pytest.mark.parametrize(
    "values, words",
    [
        ([1.0] * 99 + [-0.5], "1 negative"),
        ([1.0] * 98 + [float("nan")] * 2, "2 NaN"),
        ([None] + [1.0] * 99, "1 null"),
        ([float("inf")] + [1.0] * 99, "1 infinite"),
    ],
)
def test_bad_weights_are_an_error_naming_file_and_column(ctr, tmp_path, values, words):
    _, table, schema = ctr
    t = table.slice(0, 100).drop_columns(["weight"]).append_column("w", pa.array(values, pa.float64()))
    pq.write_table(t, tmp_path / "w.parquet")
    options = LabelOptions(weight="w")
    with pytest.raises(DataError) as err:
        _all(ParquetStream(str(tmp_path / "w.parquet"), schema, label_options=options))
    assert f"w.parquet (row group 0): weight column 'w' has {words} value(s)" in str(err.value)
    with pytest.raises(DataError, match=f"w.parquet: weight column 'w' has {words}"):
        data.load(str(tmp_path / "w.parquet"), schema, options)


def test_weight_column_checks(ctr, tmp_path):
    path, table, schema = ctr
    with pytest.raises(DataError, match="train.parquet: no weight column 'nope' \\(--weight-column\\)"):
        ParquetStream(str(path), schema, label_options=LabelOptions(weight="nope"))
    with pytest.raises(UsageError, match="--weight-column click: it is a task column"):
        ParquetStream(str(path), schema, label_options=LabelOptions(weight="click"))
    with pytest.raises(UsageError, match="--weight-column f0: it is a feature column"):
        ParquetStream(str(path), schema, label_options=LabelOptions(weight="f0"))
    with pytest.raises(UsageError, match="--missing-labels 'keep'"):
        ParquetStream(str(path), schema, label_options=LabelOptions("keep"))
    pq.write_table(
        table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(["a"] * 600)),
        tmp_path / "s.parquet",
    )
    with pytest.raises(DataError, match="weight column 'weight' is string; weights must be numeric"):
        ParquetStream(str(tmp_path / "s.parquet"), schema, label_options=LabelOptions(weight="weight"))


# ---------------------------------------------------------------------------- the losses


def _hand_losses(outputs, labels, weights, types):
    """float64: task k's loss = Σ w m l / Σ w m over the observed rows (0 where none)."""
    out = []
    for k, kind in enumerate(types):
        seen = ~np.isnan(labels[:, k])
        w = (np.ones(len(labels)) if weights is None else weights)[seen]
        x, y = outputs[k][seen], labels[seen, k]
        if kind == "binary":
            loss = np.logaddexp(0.0, x) - y * x  # BCE on logits
        else:
            loss = (x - y) ** 2
        out.append((w * loss).sum() / w.sum() if w.sum() > 0 else 0.0)
    return np.array(out)


def test_masked_losses_equal_the_hand_computation_and_their_gradients_autograd():
    schema = Schema([], [Task("a", "binary"), Task("b", "binary"), Task("r", "regression"), Task("z", "binary")])
    rng = np.random.default_rng(0)
    n = 40
    y = np.stack(
        [rng.integers(0, 2, n), rng.integers(0, 2, n), rng.normal(size=n), rng.integers(0, 2, n)], axis=1
    ).astype(np.float64)
    y[rng.random(n) < 0.5, 1] = np.nan
    y[rng.random(n) < 0.3, 2] = np.nan
    y[:, 3] = np.nan  # a task with no observed row
    w = rng.choice([0.0, 0.5, 1.0, 3.0], size=n)
    x = rng.normal(size=(4, n))
    for weights in (None, w):
        labels = torch.tensor(np.column_stack([y] if weights is None else [y, weights]), dtype=torch.float32)
        params = torch.tensor(x, dtype=torch.float32, requires_grad=True)
        outputs = {t: params[k] for k, t in enumerate(schema.task_names)}
        losses, d = masked_losses(outputs, labels, schema)
        hand = _hand_losses(
            x.astype(np.float32).astype(np.float64), y.astype(np.float32), weights, [t.type for t in schema.tasks]
        )
        assert np.allclose(losses.detach().numpy(), hand, rtol=1e-5, atol=1e-7)
        ww = np.ones(n) if weights is None else weights
        assert np.allclose(d.numpy(), [(ww * ~np.isnan(y[:, k])).sum() for k in range(4)])
        assert losses[3].item() == 0.0 and d[3].item() == 0.0
        # gradients: autograd of the float64 formula
        ref = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        lab = torch.tensor(y, dtype=torch.float64)
        wt = torch.tensor(ww, dtype=torch.float64)
        for k, task in enumerate(schema.tasks):
            (g,) = torch.autograd.grad(losses[k], params, retain_graph=True)
            seen = ~torch.isnan(lab[:, k])
            if not bool((wt * seen).sum() > 0):
                assert not g.any()
                continue
            xk, yk, wk = ref[k][seen], lab[seen, k], wt[seen]
            per = torch.nn.functional.softplus(xk) - yk * xk if task.type == "binary" else (xk - yk) ** 2
            (gr,) = torch.autograd.grad((wk * per).sum() / wk.sum(), ref)
            assert torch.allclose(g.double(), gr, atol=1e-6)
    # every label observed, no weights: the plain means, denominators B
    labels = torch.tensor(np.nan_to_num(y[:, :3]), dtype=torch.float32)
    three = Schema([], schema.tasks[:3])
    outputs = {t: torch.tensor(x[k], dtype=torch.float32) for k, t in enumerate(three.task_names)}
    losses, d = masked_losses(outputs, labels, three)
    assert torch.equal(d, torch.full((3,), float(n)))
    plain = torch.nn.functional.binary_cross_entropy_with_logits(outputs["a"], labels[:, 0])
    assert losses[0] == plain


# ---------------------------------------------------------------------------- the metrics


def _brute_auc(y, s, w):
    num = den = 0.0
    for i, j in itertools.product(range(len(y)), repeat=2):
        if y[i] == 1 and y[j] == 0:
            den += w[i] * w[j]
            num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    return num / den


def test_weighted_auc_is_the_weighted_mann_whitney_statistic():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, n) / 5.0  # many ties
        w = rng.choice([0.0, 0.25, 1.0, 2.0, 7.0], size=n)
        w[:2] = [1.0, 1.0]
        assert metrics.auc(y, s, w) == pytest.approx(_brute_auc(y, s, w), abs=1e-12)
        assert metrics.auc(y, s, np.ones(n)) == pytest.approx(metrics.auc(y, s), abs=1e-12)
        # integer weights: the same as repeating each row that many times
        reps = rng.integers(0, 4, n)
        reps[:2] = 1
        r = np.repeat(np.arange(n), reps)
        assert metrics.auc(y, s, reps) == pytest.approx(metrics.auc(y[r], s[r]), abs=1e-12)
        p = rng.random(n)
        assert metrics.logloss(y, p, weights=reps) == pytest.approx(metrics.logloss(y[r], p[r]), rel=1e-12)
        assert metrics.mse(y, p, reps) == pytest.approx(metrics.mse(y[r], p[r]), rel=1e-12)
        assert metrics.mae(y, p, reps) == pytest.approx(metrics.mae(y[r], p[r]), rel=1e-12)
    assert np.isnan(metrics.auc(np.array([0, 1]), np.array([0.1, 0.2]), np.array([1.0, 0.0])))


class _Fixed(torch.nn.Module):
    """Outputs given logits per row index (the dense input's first column holds the row's index)."""

    def __init__(self, logits: np.ndarray, tasks: list[str]) -> None:
        super().__init__()
        self.logits, self.tasks = torch.tensor(logits, dtype=torch.float32), tasks

    def forward(self, inputs):
        rows = inputs["dense"][:, 0].long()
        return {t: self.logits[rows, k] for k, t in enumerate(self.tasks)}


def test_evaluate_scores_each_task_on_its_observed_rows_weighted():
    rng = np.random.default_rng(4)
    n = 300
    schema = Schema([], [Task("click", "binary"), Task("cvr", "binary"), Task("gmv", "regression")])
    y = np.stack([rng.integers(0, 2, n), rng.integers(0, 2, n), rng.normal(size=n)], axis=1).astype(np.float32)
    y[y[:, 0] == 0, 1] = np.nan
    y[rng.random(n) < 0.2, 2] = np.nan
    w = rng.choice([0.5, 1.0, 2.0], size=n).astype(np.float32)
    logits = rng.normal(size=(n, 3))
    model = _Fixed(logits, schema.task_names)
    dense = torch.arange(n, dtype=torch.float32)[:, None]
    for weights in (None, w):
        labels = torch.from_numpy(y if weights is None else np.column_stack([y, weights]))
        ds = data.Dataset(dense, torch.zeros(n, 0, dtype=torch.int64), labels)
        result = evaluate(model, ds, schema, batch_size=64, standard_errors=True)
        for k, task in enumerate(schema.task_names):
            seen = ~np.isnan(y[:, k])
            m = result["tasks"][task]
            assert m["rows"] == seen.sum()
            ww = None if weights is None else w[seen].astype(np.float64)
            if k < 2:
                p = 1 / (1 + np.exp(-logits[seen, k].astype(np.float32).astype(np.float64)))
                assert m["auc"] == pytest.approx(_brute_auc(y[seen, k], p, np.ones(seen.sum()) if ww is None else ww))
                assert m["logloss"] == pytest.approx(metrics.logloss(y[seen, k], p, weights=ww), rel=1e-6)
                assert (m["auc_se"] is None) == (weights is not None)
            else:
                err = logits[seen, k].astype(np.float32) - y[seen, k]
                ww = np.ones(seen.sum()) if ww is None else ww
                assert m["mse"] == pytest.approx((ww * err.astype(np.float64) ** 2).sum() / ww.sum(), rel=1e-5)
                assert m["mae"] == pytest.approx((ww * np.abs(err)).sum() / ww.sum(), rel=1e-5)
    # a task with no observed row: no metric, no error
    y[:, 1] = np.nan
    ds = data.Dataset(dense, torch.zeros(n, 0, dtype=torch.int64), torch.from_numpy(y))
    m = evaluate(model, ds, schema, standard_errors=True)["tasks"]["cvr"]
    assert m == {"rows": 0, "auc": None, "logloss": None, "auc_se": None}


def test_drop_with_on_invalid_error_still_refuses_a_nan_feature(ctr, tmp_path):
    """--missing-labels drop drops null-label rows only: a NaN feature is still an error under
    --on-invalid-rows error, found by train's count before the run (and by the stream's id pass)."""
    from cogradctl.train.report import count_rows

    _, table, schema = ctr
    f0 = table.column("f0").to_numpy().copy()
    f0[300] = np.nan
    pq.write_table(table.set_column(0, "f0", pa.array(f0)), tmp_path / "f.parquet", row_group_size=128)
    s = ParquetStream(str(tmp_path / "f.parquet"), schema, label_options=LabelOptions("drop"))
    with pytest.raises(
        DataError, match=r"f.parquet \(row groups 0-4\): 1 invalid row\(s\) \(NaN or infinite values: column 'f0' 1\)"
    ):
        count_rows(s, "error")
    null = table.column("purchase").null_count
    clean = ParquetStream(str(tmp_path / "f.parquet"), schema, on_invalid="drop", label_options=LabelOptions("drop"))
    counts = count_rows(clean, "drop")
    assert counts["rows_dropped"] == null + (0 if table.column("purchase")[300].as_py() is None else 1)
    assert counts["invalid"]["purchase"] == {"null": null}
