"""Parquet in, model-ready tensors out.

``--data`` is a file, a directory (every ``*.parquet`` below it) or a glob (matched directories,
e.g. hive partitions ``events/date=2026-11-*``, contribute every ``*.parquet`` below them):
:mod:`cogradctl.parquet_files` finds and reads them (its names are reachable here too). Each file is read and
validated on its own, so an error names the file and the column. A batch handed to a model is a
dict: ``"dense"`` float32 B×D (standardised), ``"categorical"`` int64 B×C (index 0 = missing/OOV),
in the schema's feature order; labels are a float32 B×K matrix in the schema's task order (B×(K+1)
with a weight column; NaN for a label not observed: :mod:`cogradctl.labels`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cogradctl.batch import split, widths
from cogradctl.encodings import Lookup, plain_values
from cogradctl.errors import DataError
from cogradctl.labels import PLAIN, LabelOptions, weights_of
from cogradctl.lists import sequence_rows, vector_values
from cogradctl.parquet_files import _short, check_names, read_file, read_schema, resolve  # noqa: F401 (names of data)
from cogradctl.schema import (
    Schema,
    Task,
    is_label_type,
    type_problem,
)

# ---------------------------------------------------------------------------- value helpers


def _categorical_values(arr: pa.ChunkedArray, vtype: str | None) -> tuple[pa.ChunkedArray, str]:
    """A categorical column as int64 or string values (dictionaries decoded, booleans as 0/1)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.cast(t.value_type)
        t = arr.type
    if vtype is None:
        vtype = "int" if (pa.types.is_integer(t) or pa.types.is_boolean(t)) else "str"
    if pa.types.is_boolean(t):
        arr = arr.cast(pa.int8())
    return arr.cast(pa.int64() if vtype == "int" else pa.string()), vtype


def _dense_values(arr: pa.ChunkedArray, path: Path, col: str) -> np.ndarray:
    """A dense column as float64 with nulls as NaN; NaN or infinite stored values are an error."""
    values = _as_float(arr, f"{path}: column '{col}'")
    raw = values.to_numpy(zero_copy_only=False)  # nulls → NaN
    stored_nan = np.isnan(raw).sum() - values.null_count
    if stored_nan > 0 or np.isinf(raw).any():
        bad = int(stored_nan + np.isinf(raw).sum())
        raise DataError(f"{path}: column '{col}' has {bad} NaN or infinite value(s); use null for missing values")
    return raw


def _as_float(arr: pa.ChunkedArray, what: str) -> pa.ChunkedArray:
    """float64 values, or a DataError (integers beyond ±2**53 cannot be held exactly: the stream refuses them too)."""
    try:
        return arr.cast(pa.float64())
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(f"{what} cannot be read as numbers ({_short(exc)})") from exc


def _validate_labels(table: pa.Table, path: Path, tasks: list[Task], missing: str = "mask") -> None:
    """Labels numeric, finite and binary ones in {0, 1}; a null label is an error with ``missing``
    "error" only (``mask``: NaN in the label matrix; ``drop``: :func:`_drop_missing` removes its row)."""
    for task in tasks:
        arr = table.column(task.name)
        if not is_label_type(arr.type):
            raise DataError(f"{path}: task column '{task.name}' is {arr.type}; labels must be numeric or boolean")
        if arr.null_count and missing == "error":
            raise DataError(
                f"{path}: task column '{task.name}' has {arr.null_count} missing (null) label(s) (--missing-labels error)"
            )
        y = _as_float(arr, f"{path}: task column '{task.name}'").to_numpy(zero_copy_only=False)
        if int((~np.isfinite(y)).sum()) > arr.null_count:
            raise DataError(
                f"{path}: task column '{task.name}' has {int((~np.isfinite(y)).sum()) - arr.null_count} NaN or "
                "infinite label(s); use null for a missing label"
            )
        if task.type == "binary":
            bad = ~np.isnan(y) & (y != 0) & (y != 1)  # NaN here: a null label (stored NaN is refused above)
            if bad.any():
                raise DataError(
                    f"{path}: binary task column '{task.name}' has {int(bad.sum())} value(s) outside {{0, 1}} "
                    f"(e.g. {y[bad][0]:g}); declare it with --task-type {task.name}=regression at init if it is real-valued"
                )


# ---------------------------------------------------------------------------- encoding


@dataclass
class Dataset:
    """Encoded rows in memory, with where each came from (file and row range)."""

    dense: torch.Tensor  # N×(D + vector values) float32: the float block (cogradctl.batch)
    categorical: torch.Tensor  # N×(C + sequence positions + S) int64: the integer block
    labels: torch.Tensor  # N×K float32
    sources: list[tuple[str, int, int]] = field(default_factory=list)  # (file, first row, end row) in N
    oov: dict[str, int] = field(default_factory=dict)  # rows with unseen categorical values, per column
    offsets: list[int] = field(default_factory=list)  # row in its file of each source's first row (default 0)
    oov_distinct: dict[str, int] = field(default_factory=dict)  # distinct unseen values per column
    schema: Schema | None = None  # how the blocks split into a batch (None: dense and categorical only)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(
        self, index: torch.Tensor | slice, device: torch.device | str = "cpu"
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.inputs(index, device), self.labels[index].to(device)

    def inputs(self, index: torch.Tensor | slice, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The model's batch of some rows (:mod:`cogradctl.batch`)."""
        dense, ints = self.dense[index].to(device), self.categorical[index].to(device)
        return {"dense": dense, "categorical": ints} if self.schema is None else split(dense, ints, self.schema)

    def describe(self, start: int, stop: int) -> list[dict]:
        """Which files and row ranges rows [start, stop) of this dataset come from."""
        out = []
        for k, (name, lo, hi) in enumerate(self.sources):
            a, b = max(lo, start), min(hi, stop)
            first = self.offsets[k] if k < len(self.offsets) else 0
            if a < b:
                out.append({"file": name, "rows": [a - lo + first, b - lo + first]})
        return out


def load(spec: str, schema: Schema, label_options: LabelOptions = PLAIN) -> Dataset:
    """Read, validate and encode every file of ``spec`` against ``schema``; null labels and the
    weight column as ``label_options`` say (:mod:`cogradctl.labels`; dropped rows are warned about)."""
    files = resolve(spec)
    label_options.check(schema)
    parts, sources, oov, values, start, dropped = [], [], Counter(), {}, 0, 0
    lookups = lookups_of(schema)  # built once: a large vocabulary's index is sorted then
    for path in files:
        if label_options.weight is not None and label_options.weight not in read_schema(path).names:
            raise DataError(f"{path}: no weight column '{label_options.weight}' (--weight-column)")
        table = read_file(path, [*schema.columns, *label_options.extra])
        _validate_types(table, path, schema)
        _validate_labels(table, path, schema.tasks, label_options.missing)
        if label_options.missing == "drop":
            table, n = _drop_missing(table, schema.task_names)
            dropped += n
        part, unseen = encode(table, schema, path, lookups)
        if label_options.weight is not None:
            part = (
                *part[:2],
                torch.cat(
                    [
                        part[2],
                        torch.from_numpy(
                            weights_of(table.column(label_options.weight), str(path), label_options.weight)
                        ).reshape(-1, 1),
                    ],
                    dim=1,
                ),
            )
        for col, (n, distinct) in unseen.items():
            oov[col] += n
            values.setdefault(col, set()).update(distinct)
        parts.append(part)
        sources.append((str(path), start, start + table.num_rows))
        start += table.num_rows
    if dropped:
        warnings.warn(f"{spec}: dropped {dropped} row(s) with a null label (--missing-labels drop)", stacklevel=2)
    if start == 0:
        raise DataError(f"{spec}: the data has no rows" + (" left after dropping them" if dropped else ""))
    dense, cat, labels = (torch.cat([p[i] for p in parts]) for i in range(3))
    distinct = {c: len(v) for c, v in values.items()}
    if oov:
        warnings.warn(unseen_message(spec, oov, distinct), stacklevel=2)
    return Dataset(dense, cat, labels, sources, dict(oov), oov_distinct=distinct, schema=schema)


def _drop_missing(table: pa.Table, tasks: list[str]) -> tuple[pa.Table, int]:
    """``table`` without the rows that have a null label, and how many there were."""
    keep = np.ones(table.num_rows, dtype=bool)
    for name in tasks:
        keep &= table.column(name).is_valid().to_numpy(zero_copy_only=False)
    return (table, 0) if keep.all() else (table.filter(pa.array(keep)), int((~keep).sum()))


def unseen_message(spec: str, rows: dict[str, int], distinct: dict[str, int], capped=()) -> str:
    """The warning for categorical values not in the vocabulary, per column: the rows that hold one and
    the distinct values (``capped``: columns whose distinct count is a lower bound)."""
    from cogradctl.console import counted

    listed = "; ".join(
        f"{c}: {counted(n, 'row')}, {'at least ' if c in capped else ''}{counted(distinct.get(c, 0), 'distinct value')}"
        for c, n in sorted(rows.items())
        if n
    )
    return (
        f"{spec}: categorical values without a row of their own (not in the vocabulary, or outside the "
        f"encoding's range) were mapped to their column's out-of-vocabulary row: {listed}"
    )


def _validate_types(table: pa.Table, path: Path, schema: Schema) -> None:
    for f in schema.features:
        problem = type_problem(f, table.schema.field(f.name).type)
        if problem:
            raise DataError(f"{path}: column '{f.name}' {problem}")


def encode(
    table: pa.Table, schema: Schema, path: Path | str = "<table>", lookups: dict[str, Lookup] | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, tuple[int, set]]]:
    """Encode one validated table → ((floats, integers, labels), {column: (rows with a value that has no
    row of its own, those distinct values)} for the columns that have any). ``floats`` and
    ``integers`` are the two blocks :func:`cogradctl.batch.split` cuts into a model's batch.
    ``lookups``: each categorical and sequence feature's Lookup, built once for many tables
    (``lookups_of``; a large vocabulary's index is sorted when it is built)."""
    lookups = lookups or lookups_of(schema)
    n = table.num_rows
    nf, ni = widths(schema)
    floats = np.zeros((n, nf), dtype=np.float32)
    for k, f in enumerate(schema.dense):
        x = _dense_values(table.column(f.name), Path(path), f.name)
        x = (x - f.mean) / f.std
        floats[:, k] = np.nan_to_num(x, nan=0.0)
    at = len(schema.dense)
    for f in schema.vectors:
        try:
            x, bad = vector_values(table.column(f.name), f.size, f.name)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        if bad is not None:
            raise DataError(
                f"{path}: vector column '{f.name}' has {int(bad.sum())} row(s) with a NaN or infinite value"
            )
        floats[:, at : at + f.size], at = x, at + f.size
    ints = np.zeros((n, ni), dtype=np.int64)
    unseen = {}
    for k, f in enumerate(schema.categorical):
        values = table.column(f.name)
        try:
            rows, unmapped = lookups[f.name].rows(values)
        except ValueError as exc:
            raise DataError(f"{path}: categorical column '{f.name}': {exc}") from None
        if unmapped.any():
            plain = plain_values(values, f.value_type)
            unseen[f.name] = (int(unmapped.sum()), set(pc.unique(plain.filter(pa.array(unmapped))).to_pylist()))
        ints[:, k] = rows
    _encode_sequences(table, schema, path, ints, unseen, lookups)
    labels = np.stack(
        [table.column(t).cast(pa.float32()).to_numpy(zero_copy_only=False) for t in schema.task_names], axis=1
    )
    return (torch.from_numpy(floats), torch.from_numpy(ints), torch.from_numpy(labels.astype(np.float32))), unseen


def lookups_of(schema: Schema) -> dict[str, Lookup]:
    return {f.name: Lookup(f) for f in schema.categorical + schema.sequences}


def _encode_sequences(table: pa.Table, schema: Schema, path, ints: np.ndarray, unseen: dict, lookups: dict) -> None:
    """Each sequence feature's rows and lengths into ``ints`` (after the categorical columns); a list
    longer than the feature's ``max_len`` keeps its first values, counted in a warning."""
    at = len(schema.categorical)
    lengths_at = at + sum(f.max_len for f in schema.sequences)
    cut = {}
    for s, f in enumerate(schema.sequences):
        try:
            rows, lengths, flagged, values, truncated = sequence_rows(table.column(f.name), lookups[f.name], f.max_len)
        except ValueError as exc:
            raise DataError(f"{path}: sequence column '{f.name}': {exc}") from None
        ints[:, at : at + f.max_len], at = rows, at + f.max_len
        ints[:, lengths_at + s] = lengths
        if flagged.any():
            unseen[f.name] = (int(flagged.sum()), set(pc.unique(plain_values(values, f.value_type)).to_pylist()))
        if truncated:
            cut[f.name] = (truncated, f.max_len)
    if cut:
        warnings.warn(truncation_message(str(path), cut), stacklevel=3)


def truncation_message(where: str, cut: dict[str, tuple[int, int]]) -> str:
    """The warning for lists longer than their feature's ``max_len``: {column: (rows, max_len)}."""
    from cogradctl.console import counted

    listed = "; ".join(f"{c}: {counted(n, 'row')} (max_len {m})" for c, (n, m) in sorted(cut.items()))
    return f"{where}: lists longer than their feature's max_len were cut to their first values: {listed}"


def __getattr__(name: str):
    """Schema inference lives in :mod:`cogradctl.infer` (it reads partition keys as the stream does);
    its names stay reachable here for existing callers, imported on first use (no import cycle)."""
    if name in ("infer_schema", "infer_from_options", "SchemaOptions", "SCHEMA_HEADER_BUDGET"):
        from cogradctl import infer

        return getattr(infer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
