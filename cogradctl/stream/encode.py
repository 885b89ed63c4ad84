"""Encoding: Arrow tables into model-ready arrays, exactly as :func:`cogradctl.data.encode` does,
with per-row validity, packed one row per line of bytes for the shuffle buffer (:class:`Encoder`);
and the rows of whole units as the chunks the shuffle buffer moves (:class:`UnitEncoder`).

Invalid rows (NaN or infinite dense features or labels) are an error naming the file, row group
and column (``on_invalid="error"``), or are dropped and counted (``"drop"``). A null label is
masked (NaN in the label matrix), makes its row dropped, or makes it invalid, per the
``--missing-labels`` policy (:mod:`cogradctl.labels`). Binary labels outside {0, 1} and null,
NaN, infinite or negative weights are always an error (the task type or the weights are wrong, not
the row).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.batch import widths
from cogradctl.encodings import Lookup
from cogradctl.errors import DataError
from cogradctl.labels import PLAIN, LabelOptions, weights_of
from cogradctl.lists import sequence_rows, vector_values
from cogradctl.parquet_files import _short
from cogradctl.schema import Schema
from cogradctl.stream.files import File, Unit, read_rows, read_unit, where
from cogradctl.stream.shuffle import Chunk

DISTINCT_CAP = 100_000  # unseen values remembered per column to count distinct ones (bounded memory)


class Encoder:
    """Encodes Arrow tables exactly as :func:`cogradctl.data.encode`, with per-row validity."""

    def __init__(self, schema: Schema, labels: LabelOptions = PLAIN) -> None:
        self.schema = schema
        self.dense = [(f.name, float(f.mean), float(f.std)) for f in schema.dense]
        self.cats = [(f.name, Lookup(f)) for f in schema.categorical]
        self.sequences = [(f.name, Lookup(f), f.max_len) for f in schema.sequences]
        self.vectors = [(f.name, f.size) for f in schema.vectors]
        self.tasks = [(t.name, t.type) for t in schema.tasks]
        self.missing, self.weight = labels.missing, labels.weight  # the weight: label column K (labels.py)
        self.label_width = len(self.tasks) + (0 if not self.tasks or self.weight is None else 1)

        d, c = widths(schema)  # the float and the integer block (cogradctl.batch)
        self.widths = (d, c)
        k = self.label_width
        self.offsets = (0, 8 * c, 8 * c + 4 * d, 8 * c + 4 * d + 4 * k)
        self.width = max(8, -(-self.offsets[3] // 8) * 8)  # bytes per packed row, a multiple of 8

    def pack(self, dense: np.ndarray, cat: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """N×width bytes: the integer block int64, the float block float32, labels float32 side by side."""
        out = np.zeros((len(labels), self.width), dtype=np.uint8)
        o = self.offsets
        for part, (a, b), dtype in ((cat, o[0:2], np.int64), (dense, o[1:3], np.float32), (labels, o[2:4], np.float32)):
            if b > a:
                out[:, a:b].view(dtype)[:] = part
        return out

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o = self.offsets
        return tuple(
            np.ascontiguousarray(rows[:, a:b]).view(dtype).reshape(len(rows), n)
            for (a, b), dtype, n in (
                (o[1:3], np.float32, self.widths[0]),
                (o[0:2], np.int64, self.widths[1]),
                (o[2:4], np.float32, self.label_width),
            )
        )

    def empty(self):
        return (
            np.zeros((0, self.widths[0]), np.float32),
            np.zeros((0, self.widths[1]), np.int64),
            np.zeros((0, self.label_width), np.float32),
        )

    # -- validity

    def _dense_raw(self, arr, where: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """float64 values (nulls NaN) and the mask of stored NaN/inf (None when there is none)."""
        try:
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            values = arr.cast(pa.float64())
        except (pa.ArrowException, ValueError) as exc:
            raise DataError(f"{where}: column '{name}' cannot be read as numbers ({_short(exc)})") from exc
        raw = values.to_numpy(zero_copy_only=False)
        finite = np.isfinite(raw)
        if finite.all():
            return raw, None
        bad = ~finite
        if values.null_count:
            bad &= values.is_valid().to_numpy(zero_copy_only=False)
        return raw, (bad if bad.any() else None)

    def _labels(self, table: pa.Table, where: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """→ (labels N×label_width f32, {task: rows it makes invalid}, {task: rows it makes dropped}).

        A stored NaN or infinite label makes its row invalid; a null label is NaN in the matrix
        (``mask``), makes its row dropped whatever ``on_invalid`` says (``drop``), or invalid
        (``error``). The weight column, when read, is label column K (a bad weight: DataError)."""
        labels = np.empty((table.num_rows, self.label_width), dtype=np.float32)
        bad, absent = {}, {}
        for k, (name, kind) in enumerate(self.tasks):
            y, valid = _numbers(table.column(name), where, f"task column '{name}'")
            finite = np.isfinite(y)
            if not finite.all():
                if self.missing == "error" or valid is None:
                    bad[name] = ~finite
                else:
                    stored = ~finite & valid  # NaN or inf written as such: never a missing label
                    if stored.any():
                        bad[name] = stored
                    if self.missing == "drop" and not valid.all():
                        absent[name] = ~valid
            if kind == "binary":
                out = finite & (y != 0) & (y != 1)
                if out.any():
                    raise DataError(
                        f"{where}: binary task column '{name}' has {int(out.sum())} value(s) outside {{0, 1}} "
                        f"(e.g. {y[out][0]:g}); declare it with --task-type {name}=regression at init "
                        "if it is real-valued"
                    )
            labels[:, k] = y
        if self.label_width > len(self.tasks):
            labels[:, -1] = weights_of(table.column(self.weight), where, self.weight)
        return labels, bad, absent

    def _invalid(
        self,
        bad: dict[str, np.ndarray],
        n: int,
        where: str,
        on_invalid: str,
        label_cols: set,
        absent: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray | None:
        """The keep-mask (None: every row kept): rows with a value in ``bad`` are an error
        (``on_invalid="error"``) or dropped; rows in ``absent`` (a null label under
        ``--missing-labels drop``) are dropped either way."""
        if not bad and not absent:
            return None
        mask = np.zeros(n, dtype=bool)
        for m in bad.values():
            mask |= m
        if bad and on_invalid == "error":
            what = ", ".join(
                f"{'task column' if c in label_cols else 'column'} '{c}' {int(m.sum())}" for c, m in bad.items()
            )
            nulls = ", or null labels (--missing-labels error)" if self.missing == "error" else ""
            raise DataError(
                f"{where}: {int(mask.sum())} invalid row(s) (NaN or infinite values{nulls}: {what}); "
                "use null for a missing value, or --on-invalid-rows drop to skip such rows"
            )
        for m in (absent or {}).values():
            mask |= m
        return ~mask

    def drops(self, on_invalid: str) -> bool:
        """Whether any row may be dropped: ``--on-invalid-rows drop`` or ``--missing-labels drop``."""
        return on_invalid == "drop" or (self.missing == "drop" and bool(self.tasks))

    def valid(self, table: pa.Table, where: str, on_invalid: str = "drop") -> np.ndarray | None:
        """The keep-mask of ``table`` (None: every row valid), without encoding (``on_invalid="error"``:
        an invalid row raises, as :meth:`encode` would; only null labels under ``drop`` are dropped)."""
        bad = {}
        for name, _, _ in self.dense:
            _, m = self._dense_raw(table.column(name), where, name)
            if m is not None:
                bad[name] = m
        for name, size in self.vectors:
            with _naming(where, "vector", name):
                _, m = vector_values(table.column(name), size, name)
            if m is not None:
                bad[name] = m
        _, lbad, absent = self._labels(table, where)
        bad.update(lbad)
        return self._invalid(bad, table.num_rows, where, on_invalid, set(lbad), absent)

    # -- encoding

    def encode(self, table: pa.Table, where: str, on_invalid: str):
        """→ (float block N×F f32, integer block N×I i64 (:mod:`cogradctl.batch`), labels N×K f32, keep
        mask or None, unseen per column: {column: (rows, the distinct unseen values of this table)} for
        columns with any, truncated: {sequence column: rows whose list was cut to max_len})."""
        n = table.num_rows
        bad = {}
        dense = np.empty((n, self.widths[0]), dtype=np.float32)
        for k, (name, mean, std) in enumerate(self.dense):
            raw, m = self._dense_raw(table.column(name), where, name)
            if m is not None:
                bad[name] = m
            x = (raw - mean) / std
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # inf only in rows that get dropped
            dense[:, k] = x
        self._vectors(table, where, dense, bad)
        labels, lbad, absent = self._labels(table, where)
        bad.update(lbad)
        keep = self._invalid(bad, n, where, on_invalid, set(lbad), absent)
        cat = np.empty((n, self.widths[1]), dtype=np.int64)
        unseen = {}
        for k, (name, lookup) in enumerate(self.cats):
            arr = table.column(name)
            with _naming(where, "categorical", name):
                cat[:, k], unmapped = lookup.rows(arr)
            if unmapped.any():  # counted over every row read, dropped ones included
                unseen[name] = (int(unmapped.sum()), _distinct(arr, unmapped))
        truncated = self._sequences(table, where, cat, unseen)
        return dense, cat, labels, keep, unseen, truncated

    def _vectors(self, table: pa.Table, where: str, dense: np.ndarray, bad: dict) -> None:
        at = len(self.dense)
        for name, size in self.vectors:
            with _naming(where, "vector", name):
                x, m = vector_values(table.column(name), size, name)
            dense[:, at : at + size], at = x, at + size
            if m is not None:
                bad[name] = m

    def _sequences(self, table: pa.Table, where: str, cat: np.ndarray, unseen: dict) -> dict[str, int]:
        at = len(self.cats)
        lengths_at = at + sum(m for _, _, m in self.sequences)
        truncated = {}
        for s, (name, lookup, max_len) in enumerate(self.sequences):
            with _naming(where, "sequence", name):
                rows, lengths, flagged, values, cut = sequence_rows(table.column(name), lookup, max_len)
            cat[:, at : at + max_len], at = rows, at + max_len
            cat[:, lengths_at + s] = lengths
            if flagged.any():
                unseen[name] = (int(flagged.sum()), _distinct(values, np.ones(len(values), dtype=bool)))
            if cut:
                truncated[name] = cut
        return truncated


@contextmanager
def _naming(where: str, kind: str, name: str):
    """A value without a row (ValueError) or an unreadable column as a DataError naming both."""
    try:
        yield
    except ValueError as exc:
        raise DataError(f"{where}: {kind} column '{name}': {exc}") from None
    except (pa.ArrowException, TypeError, IndexError) as exc:
        raise DataError(f"{where}: {kind} column '{name}' cannot be encoded ({_short(exc)})") from exc


def _distinct(arr, unmapped: np.ndarray) -> list:
    """The distinct values of ``arr`` that had no row of their own (``unmapped``: never a null)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    values = pc.unique(arr.filter(pa.array(unmapped)))
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values.to_pylist()


class UnitEncoder:
    """The rows of units as chunks for the shuffle buffer: encoded, ids only (while skipping), or
    gathered by global ids. Invalid rows are raised or dropped per ``on_invalid`` and counted in
    ``stats`` (the stream's dict: ``rows_read``, ``rows_dropped``, ``oov`` (rows of unseen categorical
    values per column), ``oov_distinct`` (distinct unseen values per column, at most DISTINCT_CAP),
    ``oov_distinct_capped`` (columns with more distinct unseen values than that), ``labels_masked``
    (labels not observed, per task, in the rows used, under ``--missing-labels mask``))."""

    def __init__(self, encoder: Encoder, files: list[File], units: list[Unit], on_invalid: str, stats: dict) -> None:
        self.encoder, self.files, self.units, self.on_invalid, self.stats = encoder, files, units, on_invalid, stats
        self.starts = np.array([u.start for u in units], dtype=np.int64)  # global row of each unit's first row
        self.unseen: dict[str, set] = {}  # the distinct unseen values per column (up to DISTINCT_CAP)

    def where(self, u: Unit) -> str:
        return where(self.files[u.file], u)

    def encode(self, table: pa.Table, at: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dense, categorical, labels) of ``table``, invalid rows raised or dropped, and counted."""
        dense, cat, labels, keep, oov, truncated = self.encoder.encode(table, at, self.on_invalid)
        self.count(table.num_rows, keep, oov, truncated)
        if keep is not None:
            dense, cat, labels = dense[keep], cat[keep], labels[keep]
        self.count_masked(labels)
        return dense, cat, labels

    def count_masked(self, labels: np.ndarray) -> None:
        """Count the masked (unobserved) labels per task of rows used (``stats["labels_masked"]``)."""
        k = len(self.encoder.tasks)
        if not k or self.encoder.missing != "mask":
            return
        per_task = np.isnan(labels[:, :k]).sum(axis=0)
        masked = self.stats.setdefault("labels_masked", {})
        for (name, _), n in zip(self.encoder.tasks, per_task.tolist()):
            if n:
                masked[name] = masked.get(name, 0) + int(n)

    def count(self, rows: int, keep, oov: dict[str, tuple[int, list]], truncated: dict[str, int] | None = None) -> None:
        self.stats["rows_read"] += rows
        for col, n in (truncated or {}).items():
            self.stats["truncated"][col] = self.stats["truncated"].get(col, 0) + n
        if keep is not None:
            self.stats["rows_dropped"] += int((~keep).sum())
        for col, (n, values) in oov.items():
            self.stats["oov"][col] = self.stats["oov"].get(col, 0) + n
            seen = self.unseen.setdefault(col, set())
            new = [v for v in values if v not in seen]
            if len(seen) + len(new) > DISTINCT_CAP:  # "at least" from here on
                new = new[: DISTINCT_CAP - len(seen)]
                if col not in self.stats["oov_distinct_capped"]:
                    self.stats["oov_distinct_capped"].append(col)
            seen.update(new)
            self.stats["oov_distinct"][col] = len(seen)

    def encoded(self, u: Unit) -> Iterator[Chunk]:
        """Encoded chunks of one unit (invalid rows raised or dropped)."""
        for _, table in read_unit(self.files[u.file], u):
            dense, cat, labels = self.encode(table, self.where(u))
            if len(labels):
                yield Chunk(self.encoder.pack(dense, cat, labels), True)

    def ids(self, u: Unit) -> Chunk:
        """The ids of one unit's valid rows, as one chunk, without encoding (the data is read only
        when rows may be dropped)."""
        if not self.encoder.drops(self.on_invalid):
            return Chunk(np.arange(u.start, u.start + u.rows, dtype=np.int64))
        parts = []
        for offset, table in read_unit(self.files[u.file], u):
            keep = self.encoder.valid(table, self.where(u), self.on_invalid)
            ids = np.arange(u.start + offset, u.start + offset + table.num_rows, dtype=np.int64)
            self.stats["rows_dropped"] += 0 if keep is None else int((~keep).sum())
            parts.append(ids if keep is None else ids[keep])
        return Chunk(np.concatenate(parts) if parts else np.zeros(0, np.int64))

    def gather(self, ids: np.ndarray) -> Chunk:
        """Encoded rows for global ids (any order), reading only the row groups that hold them."""
        if not len(ids):
            return Chunk(self.encoder.pack(*self.encoder.empty()), True)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        which = np.searchsorted(self.starts, sorted_ids, side="right") - 1
        parts = []
        for k in np.unique(which):
            u = self.units[int(k)]
            local = sorted_ids[which == k] - u.start
            table = read_rows(self.files[u.file], u)
            dense, cat, labels, *_ = self.encoder.encode(table.take(pa.array(local)), self.where(u), "drop")
            parts.append(Chunk(self.encoder.pack(dense, cat, labels), True))
        merged = Chunk.concat(parts)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return merged.take(inverse)


def _numbers(arr, where: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A column as float64 (nulls NaN) and its non-null mask (None when no value is null)."""
    try:
        values = arr.cast(pa.float64())
    except (pa.ArrowException, ValueError) as exc:
        raise DataError(f"{where}: {what} cannot be read as numbers ({_short(exc)})") from exc
    valid = None
    if values.null_count:
        valid = (values.is_valid() if isinstance(values, pa.Array) else pc.is_valid(values)).to_numpy(
            zero_copy_only=False
        )
    return values.to_numpy(zero_copy_only=False), valid
