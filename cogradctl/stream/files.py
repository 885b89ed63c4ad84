"""Files and row groups: resolving ``--data``, validating each file from its footer, hive partition
keys, reading one row group (or a piece of it) in record batches, and cutting the units into data
shards.

Rows are numbered globally: files in sorted order, rows in file order. A :class:`Unit` is one
non-empty row group of one file, or (data shards) a contiguous piece of one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cogradctl.errors import DataError
from cogradctl.parquet_files import _short, check_names, resolve
from cogradctl.schema import Schema, is_label_type, type_problem

READ_ROWS = 65_536  # rows per record batch read from a row group
SMALL_GROUP = 256  # row groups of fewer rows, consecutive in a file, are read as one unit (coalesce)

_PARTITION = re.compile(r"^([^=/\\]+)=([^=/\\]*)$")


def partitions(path: Path) -> dict[str, str]:
    """Hive partition keys of a path: every ``key=value`` directory component."""
    out = {}
    for part in path.parent.parts:
        m = _PARTITION.match(part)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def partition_array(value: str, n: int) -> pa.Array:
    """A hive partition value as a column of ``n`` rows: int64 if it parses, else float64, else string."""
    for typ, conv in ((pa.int64(), int), (pa.float64(), float)):
        try:
            return pa.array(np.full(n, conv(value)), type=typ)
        except ValueError:
            continue
    return pa.array([value] * n, type=pa.string())


@dataclass
class File:
    path: Path
    meta: pq.FileMetaData
    columns: list[str]  # schema columns stored in the file
    constants: dict[str, str]  # schema columns that come from hive partition keys
    dictionary: list[str]  # string columns read dictionary-encoded
    start: int  # global row number of the file's first row


@dataclass
class Unit:
    file: int
    group: int
    start: int  # global row number of the first row
    rows: int
    skip: int = 0  # a piece of a row group (data shards): rows of the group before this piece
    group_rows: int | None = None  # the whole row group's rows, when this is a piece of it
    groups: tuple[int, ...] = ()  # coalesced small row groups read as one (group is the first), else ()

    def piece(self, lo: int, hi: int) -> Unit:
        """Rows [lo, hi) of this unit."""
        return replace(
            self, start=self.start + lo, rows=hi - lo, skip=self.skip + lo, group_rows=self.group_rows or self.rows
        )

    @property
    def row_groups(self) -> list[int]:
        return list(self.groups or (self.group,))


def coalesce(units: list[Unit]) -> list[Unit]:
    """``units`` (whole row groups, in file order) with every run of consecutive small row groups
    (fewer than SMALL_GROUP rows) of one file merged into units of at most READ_ROWS rows, so that
    they are read, encoded and shuffled as one. Units of larger row groups are returned as they are."""
    out: list[Unit] = []
    run: list[Unit] = []
    rows = 0

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(Unit(run[0].file, run[0].group, run[0].start, rows, groups=tuple(u.group for u in run)))
        run.clear()

    for u in units:
        if u.rows >= SMALL_GROUP:
            flush()
            out.append(u)
            continue
        if run and (run[0].file != u.file or rows + u.rows > READ_ROWS):
            flush()
        if not run:
            rows = 0
        run.append(u)
        rows += u.rows
    flush()
    return out


def scan(spec: str, schema: Schema, extra: tuple[str, ...] = ()) -> tuple[list[File], list[Unit], int]:
    """(files, units of their non-empty row groups, total rows) of ``spec``, from the footers only;
    ``extra``: numeric columns read besides the schema's (the weight column)."""
    files: list[File] = []
    units: list[Unit] = []
    start = 0
    for path in resolve(spec):
        f = open_file(path, start, schema, extra)
        for g in range(f.meta.num_row_groups):
            n = f.meta.row_group(g).num_rows
            if n:
                units.append(Unit(len(files), g, start, n))
            start += n
        files.append(f)
    return files, units, start


# ---------------------------------------------------------------------------- validation (footers only)


def open_file(path: Path, start: int, schema: Schema, extra: tuple[str, ...] = ()) -> File:
    """``path`` checked against ``schema`` from its footer: every column present (stored or a hive
    partition key) and of a type the schema can encode; the ``extra`` columns present and numeric."""
    try:
        pf = pq.ParquetFile(path)
        arrow = pf.schema_arrow
        meta = pf.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_short(exc)})") from exc
    check_names(path, arrow)
    names = set(arrow.names)
    keys = partitions(path)
    missing = [c for c in schema.columns if c not in names and c not in keys]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (the checkpoint's schema needs them)")
    _check_types(path, arrow, names, schema)
    for name in extra:
        if name not in names and name not in keys:
            raise DataError(f"{path}: no weight column '{name}' (--weight-column)")
        if name in names and not is_label_type(arrow.field(name).type):
            raise DataError(f"{path}: weight column '{name}' is {arrow.field(name).type}; weights must be numeric")
    wanted = [*schema.columns, *(c for c in extra if c not in schema.columns)]
    columns = [c for c in wanted if c in names]
    dictionary = [
        c.name
        for c in schema.categorical
        if c.name in names
        and (pa.types.is_string(arrow.field(c.name).type) or pa.types.is_large_string(arrow.field(c.name).type))
    ]
    constants = {c: keys[c] for c in wanted if c not in names}
    return File(path, meta, columns, constants, dictionary, start)


def _check_types(path: Path, arrow: pa.Schema, names: set[str], schema: Schema) -> None:
    for feat in schema.features:
        problem = type_problem(feat, arrow.field(feat.name).type) if feat.name in names else None
        if problem:
            raise DataError(f"{path}: column '{feat.name}' {problem}")
    for task in schema.tasks:
        if task.name in names and not is_label_type(arrow.field(task.name).type):
            raise DataError(
                f"{path}: task column '{task.name}' is {arrow.field(task.name).type}; labels must be numeric or boolean"
            )


# ---------------------------------------------------------------------------- reading


def where(f: File, u: Unit) -> str:
    """How errors name a unit: its file and row group (coalesced: the range of row groups)."""
    if u.groups:
        return f"{f.path} (row groups {u.groups[0]}-{u.groups[-1]})"
    return f"{f.path} (row group {u.group})"


def read_unit(f: File, u: Unit) -> Iterator[tuple[int, pa.Table]]:
    """(offset in the unit, table of up to READ_ROWS rows) for one row group of ``f`` (or the
    coalesced row groups of ``u``), or the piece of it that ``u`` names."""
    expected = u.group_rows or u.rows
    lo, hi = u.skip, u.skip + u.rows
    offset = 0  # in the row group
    try:
        pf = pq.ParquetFile(f.path, metadata=f.meta, read_dictionary=f.dictionary or None)
        batches = pf.iter_batches(batch_size=READ_ROWS, row_groups=u.row_groups, columns=f.columns, use_threads=False)
        for rb in _merged(batches) if u.groups else batches:
            n = rb.num_rows
            if offset + n > expected:
                offset += n
                break
            if offset + n > lo and offset < hi:
                a, b = max(lo - offset, 0), min(hi - offset, n)
                table = pa.Table.from_batches([rb.slice(a, b - a) if (a, b) != (0, n) else rb])
                for name, value in f.constants.items():
                    table = table.append_column(name, partition_array(value, table.num_rows))
                yield offset + a - lo, table
            offset += n
            if offset >= hi and u.group_rows:
                return  # a piece: the rest of the group is another shard's
    except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
        raise DataError(f"{where(f, u)}: not a readable Parquet file ({_short(exc)})") from exc
    if offset != expected:  # a damaged footer or column chunk
        raise DataError(
            f"{where(f, u)}: not a readable Parquet file (the footer says {expected} rows, "
            f"the data has {'at least ' if offset > expected else ''}{offset})"
        )


def _merged(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Record batches of coalesced row groups merged up to READ_ROWS rows: Arrow yields one per row
    group when a column is read dictionary-encoded (each group has its own dictionary)."""
    acc: list[pa.RecordBatch] = []
    n = 0
    for rb in batches:
        if acc and n + rb.num_rows > READ_ROWS:
            yield _concat(acc)
            acc, n = [], 0
        acc.append(rb)
        n += rb.num_rows
    if acc:
        yield _concat(acc)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    table = pa.Table.from_batches(batches).unify_dictionaries().combine_chunks()
    return table.to_batches()[0]


def carry_type(f: File, name: str) -> pa.DataType:
    """The Arrow type column ``name`` of ``f`` is read as: stored (from the footer), or a hive
    partition key (as :func:`partition_array` types it); a DataError naming the file if neither."""
    arrow = f.meta.schema.to_arrow_schema()
    if name in arrow.names:
        return arrow.field(name).type
    keys = partitions(f.path)
    if name in keys:
        return partition_array(keys[name], 0).type
    raise DataError(f"{f.path}: no column '{name}' to carry through (--keep-columns)")


def with_carry(f: File, names: list[str]) -> File:
    """``f`` reading the columns ``names`` too (stored, or hive partition keys), besides the schema's."""
    stored = set(f.meta.schema.to_arrow_schema().names)
    keys = partitions(f.path)
    extra = [c for c in names if c in stored and c not in f.columns]
    constants = {c: keys[c] for c in names if c not in stored and c in keys}
    return replace(f, columns=f.columns + extra, constants={**f.constants, **constants})


def read_rows(f: File, u: Unit) -> pa.Table:
    """The whole unit as one table."""
    return pa.concat_tables([t for _, t in read_unit(f, u)])


# ---------------------------------------------------------------------------- data shards


def cut(units: list[Unit], shards: int) -> list[list[Unit]]:
    """``units`` (in order) cut into ``shards`` contiguous parts of equal row counts (±1)."""
    total = sum(u.rows for u in units)
    bounds = [total * s // shards for s in range(shards + 1)]
    parts: list[list[Unit]] = [[] for _ in range(shards)]
    at = 0
    for u in units:
        for s in range(shards):
            lo, hi = max(bounds[s], at), min(bounds[s + 1], at + u.rows)
            if lo < hi:
                parts[s].append(u if (lo, hi) == (at, at + u.rows) else u.piece(lo - at, hi - at))
        at += u.rows
    return parts
