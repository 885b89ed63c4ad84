"""Per-row predictions of a checkpoint's model on Parquet data, written to Parquet (``cogradctl predict``).

The output has one row per input row, in the input's order (files in the stream's sorted order,
rows in file order; never shuffled), with the ``keep`` columns copied through unchanged (their
Arrow types kept) followed by one float64 column per task, named after the task: the probability
sigmoid(logit) for a binary task, the model's raw output for a regression task. Both are computed
exactly as ``evaluate`` computes the predictions it scores.

Only the checkpoint's feature columns are required: labels are neither needed nor read
(``ParquetStream(labels=False)``), so only NaN/infinite feature values make a row invalid; those
are an error or are dropped and counted (``--on-invalid-rows``), never dropped silently.

Memory is bounded: one record batch read, one forward batch and about one output row group in
flight; the input is never materialised. The output goes to a temporary file beside ``out``,
fsynced and renamed into place at the end, so on any error nothing is left at ``out`` (an existing
file there is kept intact until the rename).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cogradctl.atomic_files import staged_file
from cogradctl.batch import split
from cogradctl.errors import DataError, PluginError, UsageError
from cogradctl.schema import Schema
from cogradctl.stream import ParquetStream

ROW_GROUP = 65_536  # rows per output row group (independent of the batch size)
OUTPUT_KIND = {"binary": "probability", "regression": "value"}


def check_request(stream: ParquetStream, schema: Schema, out: Path, keep: list[str], overwrite: bool) -> pa.Schema:
    """Check the output path and the keep-columns before anything is written; → the output's schema.

    Refused (UsageError): an ``out`` that is one of the input files (even with ``overwrite``), a
    directory, an existing file without ``overwrite``; a keep-column named twice or named like a
    task (its prediction column). A keep-column missing from an input file, or typed differently in
    two files, is a DataError naming the file and the column.
    """
    for f in stream.files:
        if _same_file(out, f.path):
            raise UsageError(f"--out {out}: is the input file {f.path}; predictions never overwrite their input")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the Parquet file to write, e.g. {out / 'preds.parquet'}")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: file exists; pass --overwrite to replace it")
    twice = sorted({c for c in keep if keep.count(c) > 1})
    if twice:
        raise UsageError(f"--keep-columns: {', '.join(twice)} named twice")
    clash = [c for c in keep if c in schema.task_names]
    if clash:
        raise UsageError(
            f"--keep-columns {', '.join(clash)}: the output's prediction column for task {clash[0]!r} has that name; "
            "keep another column (predictions are named after their tasks)"
        )
    carried = stream.carried(keep)
    fields = list(carried) + [pa.field(t.name, pa.float64()) for t in schema.tasks]
    about = {"tasks": {t.name: OUTPUT_KIND[t.type] for t in schema.tasks}, "kept": keep}
    return pa.schema(fields, metadata={"cogradctl": json.dumps(about)})


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def predict(
    model: torch.nn.Module,
    stream: ParquetStream,
    schema: Schema,
    out: Path,
    keep: list[str] | None = None,
    batch_size: int = 8192,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Write ``model``'s per-row predictions on ``stream`` to ``out``; → the summary.

    ``stream`` should be opened with ``labels=False`` (labels are not needed; with labels they are
    read and checked). The summary: ``out``, ``rows_read``, ``rows_written``, ``rows_dropped``,
    ``columns``, ``tasks`` ({task: {"output": "probability" | "value", "mean", "min", "max",
    "nonfinite"}}, statistics over the finite outputs), ``oov`` (unseen categorical values per
    column) and ``seconds``.
    """
    keep = list(keep or [])
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    out = Path(out)
    out_schema = check_request(stream, schema, out, keep, overwrite)
    started = time.perf_counter()
    stats = {t.name: _TaskStats() for t in schema.tasks}
    written = 0
    was_training = model.training
    model.eval()
    try:
        with _atomic_parquet(out, out_schema) as write:
            for dense, cat, kept in _rebatch(stream.in_order(keep), batch_size):
                columns = _forward(model, dense, cat, schema, device)
                for task, values in zip(schema.tasks, columns):
                    stats[task.name].add(values)
                write(pa.Table.from_arrays([*kept.columns, *map(pa.array, columns)], schema=out_schema))
                written += len(dense)
            if written == 0:
                raise DataError(
                    f"{stream.spec}: no rows left after dropping {stream.stats['rows_dropped']} invalid row(s)"
                )
    finally:
        model.train(was_training)
    return {
        "out": str(out),
        "rows_read": stream.stats["rows_read"],
        "rows_written": written,
        "rows_dropped": stream.stats["rows_dropped"],
        "columns": out_schema.names,
        "tasks": {t.name: {"output": OUTPUT_KIND[t.type], **stats[t.name].summary()} for t in schema.tasks},
        "oov": {c: n for c, n in stream.stats["oov"].items() if n},
        "seconds": round(time.perf_counter() - started, 3),
    }


@torch.inference_mode()
def _forward(model: torch.nn.Module, dense: np.ndarray, cat: np.ndarray, schema: Schema, device) -> list:
    """One forward pass → one float64 array per task: sigmoid(logit) for binary tasks, the raw
    output for regression (computed as ``evaluate.predict_with_labels`` computes them)."""
    outputs = model(split(torch.from_numpy(dense).to(device), torch.from_numpy(cat).to(device), schema))
    n = len(dense)
    columns = []
    for task in schema.tasks:
        y = outputs.get(task.name) if isinstance(outputs, Mapping) else None
        if not isinstance(y, torch.Tensor) or y.numel() != n:
            got = "nothing" if y is None else f"{type(y).__name__} of shape {tuple(getattr(y, 'shape', ()))}"
            raise PluginError(f"the model returned {got} for task {task.name!r}; expected {n} values (one per row)")
        y = y.reshape(n).float()
        columns.append((torch.sigmoid(y) if task.type == "binary" else y).cpu().numpy().astype(np.float64))
    return columns


def _rebatch(
    pieces: Iterator[tuple[np.ndarray, np.ndarray, pa.Table]], batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, pa.Table]]:
    """The rows of ``pieces`` (dense, categorical, kept columns), in order, as batches of exactly
    ``batch_size`` rows (the last may be smaller). Slices are views; each batch is copied once."""
    parts, have = [], 0
    for dense, cat, kept in pieces:
        at, n = 0, len(dense)
        while at < n:
            k = min(batch_size - have, n - at)
            parts.append((dense[at : at + k], cat[at : at + k], kept.slice(at, k)))
            have, at = have + k, at + k
            if have == batch_size:
                yield _concat(parts)
                parts, have = [], 0
    if have:
        yield _concat(parts)


def _concat(parts: list) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    if len(parts) == 1:
        return parts[0]
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        pa.concat_tables([p[2] for p in parts]),
    )


@contextmanager
def _atomic_parquet(out: Path, schema: pa.Schema):
    """Yields ``write(table)``: tables appended in order, in row groups of ROW_GROUP rows, to a
    temporary file beside ``out`` that lands on ``out`` only when the block ends without an error
    (``atomic_files.staged_file``, as every output is written)."""
    with staged_file(out) as (fh, _), pq.ParquetWriter(fh, schema) as writer:
        groups = _RowGroups(writer)
        yield groups.write
        groups.flush()


class _RowGroups:
    """Tables appended in order and written in row groups of ROW_GROUP rows, whatever their sizes,
    so that the file's layout does not depend on the batch size."""

    def __init__(self, writer: pq.ParquetWriter) -> None:
        self.writer, self.pending, self.rows = writer, [], 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP:
            merged = pa.concat_tables(self.pending)
            full = self.rows // ROW_GROUP * ROW_GROUP
            self.writer.write_table(merged.slice(0, full), row_group_size=ROW_GROUP)
            self.pending, self.rows = [merged.slice(full)], self.rows - full

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=ROW_GROUP)
        self.pending, self.rows = [], 0


class _TaskStats:
    """Running mean, min and max of one task's finite outputs, and the count of non-finite ones."""

    def __init__(self) -> None:
        self.n, self.total, self.lo, self.hi, self.nonfinite = 0, 0.0, np.inf, -np.inf, 0

    def add(self, values: np.ndarray) -> None:
        finite = values[np.isfinite(values)]
        self.nonfinite += len(values) - len(finite)
        if len(finite):
            self.n += len(finite)
            self.total += float(finite.sum())
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))

    def summary(self) -> dict:
        if not self.n:
            return {"mean": None, "min": None, "max": None, "nonfinite": self.nonfinite}
        return {"mean": self.total / self.n, "min": self.lo, "max": self.hi, "nonfinite": self.nonfinite}
