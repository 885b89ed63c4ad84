"""How labels are read, and the label matrix every consumer receives (docs/data.md, "Labels").

The label matrix of a batch is float32, one row per data row: B×K in the schema's task order, or
B×(K+1) when a weight column is read (``--weight-column``), column K then holding each row's
weight. A label that is not observed (a null, under ``--missing-labels mask``) is NaN; a stored NaN
or infinite label is never read as one (the row is invalid: use null for a missing label). Code that
reads ``labels[:, k]`` for k < K is unaffected by the weight column; :func:`split` gives the three
parts. The options are the command's (train, evaluate, measure-transference), not the checkpoint's.

``--missing-labels``: ``mask`` (the default) keeps the row and leaves that task's label out of
that task's loss and metrics only: a null label means "not observed" (CVR on a row without a
click), so masking loses no row and biases no task, and every command counts the masked labels
per task. ``drop`` drops every row with a null label (counted, whatever ``--on-invalid-rows``
says). ``error`` is the former behaviour: a null label makes the row invalid (an error, or dropped
with ``--on-invalid-rows drop``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cogradctl.errors import DataError, UsageError
from cogradctl.schema import is_label_type

MISSING_LABELS = ("mask", "drop", "error")


@dataclass(frozen=True)
class LabelOptions:
    """``missing``: what a null label means (MISSING_LABELS); ``weight``: the weight column, or None."""

    missing: str = "mask"
    weight: str | None = None

    def check(self, schema=None) -> LabelOptions:
        """→ self, or a UsageError naming the option (a weight column that is a task or a feature)."""
        if self.missing not in MISSING_LABELS:
            raise UsageError(f"--missing-labels {self.missing!r}: expected one of {', '.join(MISSING_LABELS)}")
        if self.weight is not None:
            if not str(self.weight).strip():
                raise UsageError("--weight-column is empty: give the column of row weights")
            if schema is not None and self.weight in schema.columns:
                role = "task" if self.weight in schema.task_names else "feature"
                raise UsageError(
                    f"--weight-column {self.weight}: it is a {role} column of the checkpoint's schema; "
                    "a weight column must be a column of its own"
                )
        return self

    @property
    def extra(self) -> tuple[str, ...]:
        """The columns read besides the schema's (the weight column)."""
        return () if self.weight is None else (self.weight,)


PLAIN = LabelOptions()


def split(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values B×K with NaN where unobserved, observed B×K bool, weights B or None) of a label matrix."""
    y = labels[:, :k]
    return y, ~torch.isnan(y), labels[:, k] if labels.shape[1] > k else None


def weights_of(column, where: str, name: str) -> np.ndarray:
    """A weight column (Arrow array or chunked array) → float32 weights, checked by ``checked_weights``;
    a column that is not numeric, or cannot be read as numbers, is a DataError naming ``where`` and it.
    Every reader (in memory, the stream, train's up-front check) reads weights through this."""
    if not is_label_type(column.type):
        raise DataError(f"{where}: weight column '{name}' is {column.type}; weights must be numeric")
    try:
        values = column.cast(pa.float64())
    except (pa.ArrowException, ValueError) as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where}: weight column '{name}' cannot be read as numbers ({text})") from exc
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False) if values.null_count else None
    return checked_weights(values.to_numpy(zero_copy_only=False), valid, where, name)


def checked_weights(values: np.ndarray, valid: np.ndarray | None, where: str, column: str) -> np.ndarray:
    """The weight column's values (float64; ``valid``: the non-null mask, None when every value is
    there) → float32, or a DataError naming ``where`` and the column: a weight must be finite and ≥ 0."""
    bad = ~np.isfinite(values) | (values < 0)
    if valid is not None:
        bad |= ~valid
    if bad.any():
        nulls = 0 if valid is None else int((~valid).sum())
        nan = int(np.isnan(values).sum()) - nulls
        parts = [(nulls, "null"), (nan, "NaN"), (int(np.isinf(values).sum()), "infinite")]
        parts.append((int(((values < 0) & np.isfinite(values)).sum()), "negative"))
        what = ", ".join(f"{n} {word}" for n, word in parts if n)
        raise DataError(f"{where}: weight column '{column}' has {what} value(s); weights must be finite and ≥ 0")
    return values.astype(np.float32)
