"""What a run writes as it goes: ``metrics.jsonl``, TensorBoard scalars, and the per-step record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cogradctl.atomic_files import atomic_write_bytes
from cogradctl.errors import UsageError


class MetricsLog:
    """Appends JSON lines, flushed each time. On resume, records after the saved step (written by
    the run that died after its last save) are dropped first, so the file reads as one run."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        if keep_until is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= keep_until]
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """One line of strict JSON: a NaN or infinite number is written as null."""
        self.file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line from a killed run: drop it


class NoLog:
    """metrics.jsonl on processes other than rank 0: nothing is written."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(
                '--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]" from the clone'
            ) from None
        self.writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def step_record(
    step: int, epoch: int, tasks: list[str], losses: torch.Tensor, g: torch.Tensor, observed: list[bool] | None = None
) -> dict:
    """Per-task loss and shared-gradient norm, and the pairwise cosine of the task gradients;
    ``observed`` False for a task without a labelled row in the batch: its loss is null (not the
    0 the step used), its pairs' cosine too."""
    gram = (g @ g.T).double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = {}
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            d = float(norms[i] * norms[j])
            cosine[f"{tasks[i]}|{tasks[j]}"] = float(gram[i, j]) / d if d > 0 else 0.0
    if observed is not None and not all(observed):
        for i in range(len(tasks)):
            for j in range(i + 1, len(tasks)):
                if not (observed[i] and observed[j]):
                    cosine[f"{tasks[i]}|{tasks[j]}"] = None
        losses = [float(v) if seen else None for v, seen in zip(losses, observed)]
    return {
        "step": step,
        "epoch": epoch,
        "loss": {t: None if v is None else float(v) for t, v in zip(tasks, losses)},
        "grad_norm": {t: float(v) for t, v in zip(tasks, norms)},
        "cosine": cosine,
    }


def summary(result: dict) -> str:
    """One line of an evaluation: each task's AUC (or MSE)."""
    parts = []
    for task, m in result["tasks"].items():
        if "auc" in m:
            parts.append(f"{task} auc={m['auc']:.4f}" if m["auc"] is not None else f"{task} auc=n/a")
        else:
            parts.append(f"{task} mse={m['mse']:.4f}" if m["mse"] is not None else f"{task} mse=n/a")
    return ", ".join(parts)
