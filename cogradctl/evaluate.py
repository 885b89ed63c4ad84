"""Predict and score a model on a dataset: AUC and logloss for binary tasks, MSE and MAE for regression."""

from __future__ import annotations

import math

import numpy as np
import torch

from cogradctl import metrics
from cogradctl.data import Dataset
from cogradctl.schema import Schema


@torch.no_grad()
def predict(model: torch.nn.Module, data: Dataset, schema: Schema, batch_size: int = 8192, device: torch.device | str = "cpu") -> np.ndarray:
    """N×K predictions: probabilities for binary tasks, values for regression tasks."""
    was_training = model.training
    model.eval()
    out = np.empty((len(data), len(schema.tasks)), dtype=np.float64)
    for start in range(0, len(data), batch_size):
        inputs, _ = data.batch(slice(start, start + batch_size), device)
        outputs = model(inputs)
        for k, task in enumerate(schema.tasks):
            y = outputs[task.name].float()
            out[start : start + batch_size, k] = (torch.sigmoid(y) if task.type == "binary" else y).cpu().numpy()
    model.train(was_training)
    return out


def evaluate(model: torch.nn.Module, data: Dataset, schema: Schema, batch_size: int = 8192, device: torch.device | str = "cpu") -> dict:
    """``{"rows": N, "tasks": {task: {"auc": …, "logloss": …} | {"mse": …, "mae": …}}}`` (AUC None if one class)."""
    preds = predict(model, data, schema, batch_size, device)
    labels = data.labels.numpy()
    tasks = {}
    for k, task in enumerate(schema.tasks):
        if task.type == "binary":
            a = metrics.auc(labels[:, k], preds[:, k])
            tasks[task.name] = {"auc": None if math.isnan(a) else a, "logloss": metrics.logloss(labels[:, k], preds[:, k])}
        else:
            tasks[task.name] = {"mse": metrics.mse(labels[:, k], preds[:, k]), "mae": metrics.mae(labels[:, k], preds[:, k])}
    return {"rows": len(data), "tasks": tasks}


def mean_auc(result: dict) -> float | None:
    """Mean AUC over the binary tasks that have one (None if none has)."""
    values = [m["auc"] for m in result["tasks"].values() if m.get("auc") is not None]
    return sum(values) / len(values) if values else None
