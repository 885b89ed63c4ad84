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
    """(N×K predictions: probabilities for binary tasks, values for regression; N×K labels).
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
        return np.empty((0, k)), np.empty((0, k), dtype=np.float32)
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
    """``{"rows": N, "tasks": {task: {"auc": …, "logloss": …} | {"mse": …, "mae": …}}}`` (AUC None if one class).

    ``standard_errors``: also each AUC's DeLong standard error, ``"auc_se"`` (None with fewer than
    two rows of a class); three more sorts of the rows per task, so training's periodic validation
    leaves it out and ``cogradctl evaluate`` reports it. ``progress(rows)``: called after each batch.
    """
    preds, labels = predict_with_labels(model, data, schema, batch_size, device, progress)
    tasks = {}
    for k, task in enumerate(schema.tasks):
        if task.type == "binary":
            a = metrics.auc(labels[:, k], preds[:, k])
            tasks[task.name] = {
                "auc": None if math.isnan(a) else a,
                "logloss": metrics.logloss(labels[:, k], preds[:, k]),
            }
            if standard_errors:
                se = metrics.auc_se(labels[:, k], preds[:, k])
                tasks[task.name]["auc_se"] = None if math.isnan(se) else se
        else:
            tasks[task.name] = {
                "mse": metrics.mse(labels[:, k], preds[:, k]),
                "mae": metrics.mae(labels[:, k], preds[:, k]),
            }
    return {"rows": len(labels), "tasks": tasks}


def mean_auc(result: dict) -> float | None:
    """Mean AUC over the binary tasks that have one (None if none has)."""
    values = [m["auc"] for m in result["tasks"].values() if m.get("auc") is not None]
    return sum(values) / len(values) if values else None
