"""Predict and score a model on a dataset: AUC and logloss for binary tasks, MSE and MAE for regression.

``data`` is an in-memory :class:`Dataset` or a :class:`cogradctl.stream.ParquetStream`, which is
read in order, one batch at a time (only the N×K predictions and labels are kept, for exact AUC).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cogradctl import metrics
from cogradctl.data import Dataset
from cogradctl.schema import Schema


def _batches(data, batch_size: int, device):
    if isinstance(data, Dataset):
        for start in range(0, len(data), batch_size):
            yield data.batch(slice(start, start + batch_size), device)
    else:
        yield from data.batches(batch_size, shuffle=False, device=device)


@torch.no_grad()
def predict_with_labels(
    model: torch.nn.Module,
    data,
    schema: Schema,
    batch_size: int = 8192,
    device: torch.device | str = "cpu",
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N×K predictions: probabilities for binary tasks, values for regression; the N×K label
    matrix, N×(K+1) with a weight column, NaN where a label is not observed).
    ``progress(rows)`` is called after each batch with its number of rows."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    try:
        for inputs, y_true in _batches(data, batch_size, device):
            outputs = model(inputs)
            block = np.empty((len(y_true), len(schema.tasks)), dtype=np.float64)
            for k, task in enumerate(schema.tasks):
                y = outputs[task.name].float()
                block[:, k] = (torch.sigmoid(y) if task.type == "binary" else y).cpu().numpy()
            preds.append(block)
            labels.append(y_true.cpu().numpy())
            if progress is not None:
                progress(len(y_true))
    finally:
        model.train(was_training)
    k = len(schema.tasks)
    if not preds:
        return np.empty((0, k)), np.empty((0, k), dtype=np.float32)  # (no batch: no weight column either)
    return np.concatenate(preds), np.concatenate(labels)


def evaluate(
    model: torch.nn.Module,
    data,
    schema: Schema,
    batch_size: int = 8192,
    device: torch.device | str = "cpu",
    standard_errors: bool = False,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """``{"rows": N, "tasks": {task: {"rows": …, "auc": …, "logloss": …} | {"rows": …, "mse": …, "mae": …}}}``.

    Each task is scored on its observed rows only (a null label masked: NaN in the label matrix,
    :mod:`cogradctl.labels`), whose number is its ``"rows"``; with a weight column, every metric
    is weighted (AUC: the weighted Mann–Whitney statistic, ties one half) and ``"weight"`` is the
    task's total weight. A metric is None where it is undefined: AUC with one class (or one class
    of zero weight), every metric of a task without an observed row of positive weight.

    ``standard_errors``: also each AUC's DeLong standard error, ``"auc_se"`` (None with fewer than
    two rows of a class, and with weights: DeLong's variance is derived for unweighted placements,
    not given here); three more sorts of the rows per task, so training's periodic validation
    leaves it out and ``cogradctl evaluate`` reports it. ``progress(rows)``: called after each batch.
    """
    preds, labels = predict_with_labels(model, data, schema, batch_size, device, progress)
    k = len(schema.tasks)
    weights = labels[:, k].astype(np.float64) if labels.shape[1] > k else None
    tasks = {}
    for j, task in enumerate(schema.tasks):
        seen = ~np.isnan(labels[:, j])
        y, p = labels[seen, j], preds[seen, j]
        w = None if weights is None else weights[seen]
        some = bool(seen.any()) and (w is None or w.sum() > 0)
        entry = {"rows": int(seen.sum())}
        if w is not None:
            entry["weight"] = float(w.sum())
        if task.type == "binary":
            entry["auc"] = _number(metrics.auc(y, p, w)) if some else None
            entry["logloss"] = _number(metrics.logloss(y, p, weights=w)) if some else None
            if standard_errors:
                entry["auc_se"] = _number(metrics.auc_se(y, p)) if some and w is None else None
        else:
            entry["mse"] = _number(metrics.mse(y, p, w)) if some else None
            entry["mae"] = _number(metrics.mae(y, p, w)) if some else None
        tasks[task.name] = entry
    return {"rows": len(labels), "tasks": tasks}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def mean_auc(result: dict) -> float | None:
    """Mean AUC over the binary tasks that have one (None if none has)."""
    values = [m["auc"] for m in result["tasks"].values() if m.get("auc") is not None]
    return sum(values) / len(values) if values else None
