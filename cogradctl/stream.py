"""Stream Parquet into model-ready batches with bounded memory (docs/data.md).

``ParquetStream(spec, schema)`` resolves ``spec`` (a file, a directory, a glob, or hive-partitioned
directories such as ``'events/date=2026-11-*'``) and validates every file's Arrow schema up front
from the Parquet footers alone. :meth:`ParquetStream.batches` then reads one row group at a time,
only the columns the schema needs, in record batches, and encodes them exactly as
:func:`cogradctl.data.encode` does.

Shuffling (``shuffle=True``) is two-level and deterministic for a given ``(seed, epoch)``:

1. the order of all (file, row group) units is permuted with the seed;
2. rows pass through a buffer of ``shuffle_buffer`` rows: once it is full, each batch is
   ``batch_size`` rows drawn uniformly without replacement from the buffer, and their places are
   taken by the next ``batch_size`` rows read. At the end the buffer is permuted and emptied.

Memory is bounded by the buffer, one record batch of the row group being read and one output batch;
nothing is ever materialised whole. Rows are numbered globally: files in sorted order, rows in
file order; :meth:`ParquetStream.rows` reads given global row ranges into a :class:`Dataset`.

Invalid rows (NaN or infinite dense features or labels, null labels) are an error naming the file,
row group and column (``on_invalid="error"``), or are dropped and counted (``"drop"``). Binary
labels outside {0, 1} are always an error (the task type is wrong, not the row).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from cogradctl.data import Dataset, _categorical_values, _short, resolve
from cogradctl.errors import DataError, UsageError
from cogradctl.schema import Schema, is_categorical_type, is_label_type

ON_INVALID = ("error", "drop")
READ_ROWS = 65_536  # rows per record batch read from a row group
LUT_SPAN = 1 << 22  # integer vocabularies spanning at most this many values use a lookup table

_PARTITION = re.compile(r"^([^=/\\]+)=([^=/\\]*)$")


def partitions(path: Path) -> dict[str, str]:
    """Hive partition keys of a path: every ``key=value`` directory component."""
    out = {}
    for part in path.parent.parts:
        m = _PARTITION.match(part)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _partition_array(value: str, n: int) -> pa.Array:
    for typ, conv in ((pa.int64(), int), (pa.float64(), float)):
        try:
            return pa.array(np.full(n, conv(value)), type=typ)
        except ValueError:
            continue
    return pa.array([value] * n, type=pa.string())


@dataclass
class _File:
    path: Path
    meta: pq.FileMetaData
    columns: list[str]  # schema columns stored in the file
    constants: dict[str, str]  # schema columns that come from hive partition keys
    dictionary: list[str]  # string columns read dictionary-encoded
    start: int  # global row number of the file's first row


@dataclass
class _Unit:
    file: int
    group: int
    start: int  # global row number of the first row
    rows: int
    skip: int = 0  # a piece of a row group (data shards): rows of the group before this piece
    group_rows: int | None = None  # the whole row group's rows, when this is a piece of it

    def piece(self, lo: int, hi: int) -> "_Unit":
        """Rows [lo, hi) of this unit."""
        return _Unit(self.file, self.group, self.start + lo, hi - lo, self.skip + lo, self.group_rows or self.rows)


class _Chunk:
    """Rows in flight: global row ids (while skipping), or encoded rows packed one row per line of
    bytes (categorical int64, dense float32, labels float32), so that the shuffle buffer moves each
    row with one memory access instead of one per array."""

    __slots__ = ("a", "packed")

    def __init__(self, a: np.ndarray, packed: bool = False):
        self.a, self.packed = a, packed

    def __len__(self) -> int:
        return len(self.a)

    def slice(self, a: int, b: int) -> "_Chunk":
        return _Chunk(self.a[a:b], self.packed)

    def take(self, index) -> "_Chunk":
        return _Chunk(self.a.take(index, axis=0), self.packed)

    @staticmethod
    def concat(chunks: list["_Chunk"]) -> "_Chunk":
        if len(chunks) == 1:
            return chunks[0]
        return _Chunk(np.concatenate([c.a for c in chunks]), chunks[0].packed)


class ParquetStream:
    """Parquet files read as a stream of encoded batches; see the module docstring."""

    def __init__(self, spec: str, schema: Schema, *, on_invalid: str = "error", shuffle_buffer: int = 65536) -> None:
        if on_invalid not in ON_INVALID:
            raise UsageError(f"--on-invalid-rows {on_invalid!r}: expected one of {', '.join(ON_INVALID)}")
        if shuffle_buffer < 0:
            raise UsageError(f"--shuffle-buffer must be at least 0, got {shuffle_buffer}")
        self.spec, self.schema, self.on_invalid, self.shuffle_buffer = spec, schema, on_invalid, int(shuffle_buffer)
        self.stats: dict = {"rows_read": 0, "rows_dropped": 0, "oov": {}}
        self._encoder = _Encoder(schema)
        self.files: list[_File] = []
        self.units: list[_Unit] = []
        start = 0
        for path in resolve(spec):
            f = self._open(path, start)
            for g in range(f.meta.num_row_groups):
                n = f.meta.row_group(g).num_rows
                if n:
                    self.units.append(_Unit(len(self.files), g, start, n))
                start += n
            self.files.append(f)
        self.num_rows = start
        if self.num_rows == 0:
            raise DataError(f"{spec}: the data has no rows")
        self._unit_starts = np.array([u.start for u in self.units], dtype=np.int64)

    # ------------------------------------------------------------------ validation (footers only)

    def _open(self, path: Path, start: int) -> _File:
        try:
            pf = pq.ParquetFile(path)
            arrow = pf.schema_arrow
            meta = pf.metadata
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({_short(exc)})") from exc
        names = set(arrow.names)
        keys = partitions(path)
        missing = [c for c in self.schema.columns if c not in names and c not in keys]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (the checkpoint's schema needs them)")
        for feat in self.schema.features:
            if feat.name not in names:
                continue
            t = arrow.field(feat.name).type
            if feat.kind == "dense":
                ok = pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
            else:
                ok = is_categorical_type(t) or pa.types.is_floating(t)
            if not ok:
                expected = "numeric" if feat.kind == "dense" else "integer, string or dictionary"
                raise DataError(f"{path}: column '{feat.name}' is {t}; the checkpoint expects a {expected} {feat.kind} feature")
        for task in self.schema.tasks:
            if task.name in names and not is_label_type(arrow.field(task.name).type):
                raise DataError(f"{path}: task column '{task.name}' is {arrow.field(task.name).type}; labels must be numeric or boolean")
        columns = [c for c in self.schema.columns if c in names]
        dictionary = [c.name for c in self.schema.categorical if c.name in names and (
            pa.types.is_string(arrow.field(c.name).type) or pa.types.is_large_string(arrow.field(c.name).type))]
        constants = {c: keys[c] for c in self.schema.columns if c not in names}
        return _File(path, meta, columns, constants, dictionary, start)

    # ------------------------------------------------------------------ reading

    def _parquet(self, f: _File) -> pq.ParquetFile:
        return pq.ParquetFile(f.path, metadata=f.meta, read_dictionary=f.dictionary or None)

    def _read_unit(self, u: _Unit) -> Iterator[tuple[int, pa.Table]]:
        """(offset in the unit, table of up to READ_ROWS rows) for one row group, or the piece of
        it that ``u`` names."""
        f = self.files[u.file]
        expected = u.group_rows or u.rows
        lo, hi = u.skip, u.skip + u.rows
        offset = 0  # in the row group
        try:
            for rb in self._parquet(f).iter_batches(batch_size=READ_ROWS, row_groups=[u.group], columns=f.columns, use_threads=False):
                n = rb.num_rows
                if offset + n > expected:
                    offset += n
                    break
                if offset + n > lo and offset < hi:
                    a, b = max(lo - offset, 0), min(hi - offset, n)
                    table = pa.Table.from_batches([rb.slice(a, b - a) if (a, b) != (0, n) else rb])
                    for name, value in f.constants.items():
                        table = table.append_column(name, _partition_array(value, table.num_rows))
                    yield offset + a - lo, table
                offset += n
                if offset >= hi and u.group_rows:
                    return  # a piece: the rest of the group is another shard's
        except (pa.ArrowException, OSError, ValueError, IndexError) as exc:
            raise DataError(f"{f.path} (row group {u.group}): not a readable Parquet file ({_short(exc)})") from exc
        if offset != expected:  # a damaged footer or column chunk
            raise DataError(f"{f.path} (row group {u.group}): not a readable Parquet file (the footer says {expected} rows, "
                            f"the data has {'at least ' if offset > expected else ''}{offset})")

    def _where(self, u: _Unit) -> str:
        return f"{self.files[u.file].path} (row group {u.group})"

    def _encode_unit(self, u: _Unit) -> Iterator[_Chunk]:
        """Encoded chunks of one unit (invalid rows raised or dropped)."""
        for offset, table in self._read_unit(u):
            dense, cat, labels, keep, oov = self._encoder.encode(table, self._where(u), self.on_invalid)
            self._count(table.num_rows, keep, oov)
            if keep is not None:
                dense, cat, labels = dense[keep], cat[keep], labels[keep]
            if len(labels):
                yield _Chunk(self._encoder.pack(dense, cat, labels), True)

    def _ids_unit(self, u: _Unit) -> "_Chunk":
        """The ids of one unit's valid rows, as one chunk, without encoding (the data is read only
        when rows may be dropped)."""
        if self.on_invalid == "error":
            return _Chunk(np.arange(u.start, u.start + u.rows, dtype=np.int64))
        parts = []
        for offset, table in self._read_unit(u):
            keep = self._encoder.valid(table, self._where(u))
            ids = np.arange(u.start + offset, u.start + offset + table.num_rows, dtype=np.int64)
            self.stats["rows_dropped"] += 0 if keep is None else int((~keep).sum())
            parts.append(ids if keep is None else ids[keep])
        return _Chunk(np.concatenate(parts) if parts else np.zeros(0, np.int64))

    def _count(self, rows: int, keep, oov: Counter) -> None:
        self.stats["rows_read"] += rows
        if keep is not None:
            self.stats["rows_dropped"] += int((~keep).sum())
        for col, n in oov.items():
            if n:
                self.stats["oov"][col] = self.stats["oov"].get(col, 0) + n

    def _gather(self, ids: np.ndarray) -> _Chunk:
        """Encoded rows for global ids (any order), reading only the row groups that hold them."""
        if not len(ids):
            return _Chunk(self._encoder.pack(*self._encoder.empty()), True)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        which = np.searchsorted(self._unit_starts, sorted_ids, side="right") - 1
        parts = []
        for k in np.unique(which):
            u = self.units[int(k)]
            local = sorted_ids[which == k] - u.start
            table = self._read_rows(u)
            dense, cat, labels, _, _ = self._encoder.encode(table.take(pa.array(local)), self._where(u), "drop")
            parts.append(_Chunk(self._encoder.pack(dense, cat, labels), True))
        merged = _Chunk.concat(parts)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return merged.take(inverse)

    def _read_rows(self, u: _Unit) -> pa.Table:
        return pa.concat_tables([t for _, t in self._read_unit(u)])

    # ------------------------------------------------------------------ batches

    def batches(self, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start_batch: int = 0,
                device: torch.device | str = "cpu", shards: int = 1, take: tuple[int, ...] = (0,),
                ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """One epoch of (inputs {"dense", "categorical"}, labels B×K); the last batch may be smaller.

        The same ``(seed, epoch)`` gives the same batches; ``start_batch`` skips that many batches
        of the sequence exactly (the rows they held are not encoded).

        Data shards (distributed training): with ``shards`` S > 1, the epoch's rows, in the
        permuted order of the units, are cut into S contiguous parts of equal size (±1 row; a row
        group may be cut between two shards), and each part has its own shuffle buffer and random
        generator. Batch t is then the concatenation of batch t (``batch_size`` rows) of each
        shard in ``take``; the stream ends when all of them are exhausted. The batches depend on
        (seed, epoch, S) only, so any split of the S shards among processes sees the same rows.
        """
        if batch_size < 1:
            raise UsageError(f"batch size must be positive, got {batch_size}")
        if start_batch < 0:
            raise UsageError(f"start_batch must be at least 0, got {start_batch}")
        if shards < 1 or not take or any(not 0 <= s < shards for s in take):
            raise UsageError(f"data shards {list(take)} of {shards}: expected shard numbers in [0, {shards})")
        rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
        order = rng.permutation(len(self.units)) if shuffle else np.arange(len(self.units))
        units = [self.units[k] for k in order]
        if shards == 1:
            streams = [self._shard_batches(units, batch_size, shuffle, rng, start_batch)]
        else:
            parts = _cut(units, shards)
            streams = [self._shard_batches(parts[s], batch_size, shuffle, np.random.default_rng([int(seed), int(epoch), 0x5EED, shards, s]),
                                           start_batch) for s in take]
        total = 0
        while streams:
            chunks = []
            for stream in list(streams):
                chunk = next(stream, None)
                if chunk is None:
                    streams.remove(stream)
                else:
                    chunks.append(chunk)
            if chunks:
                out = _Chunk.concat(chunks)
                total += len(out)
                yield self._tensors(out, device)
        if total == 0 and start_batch == 0 and len(take) == shards:  # this process holds every shard
            raise DataError(f"{self.spec}: no rows left after dropping {self.stats['rows_dropped']} invalid row(s)")

    def _shard_batches(self, units: list[_Unit], batch_size: int, shuffle: bool, rng: np.random.Generator,
                       start_batch: int) -> Iterator[_Chunk]:
        """The batches (encoded chunks) of one shard: ``units`` in this order through one buffer."""
        cap = max(self.shuffle_buffer, batch_size) if shuffle else 0
        state = _Shuffler(cap, batch_size, rng)
        k = 0
        if start_batch:
            # Skipping replays the same algorithm on row ids only: the random draws depend on row
            # counts alone, so the rows in flight afterwards are exactly those of the full run.
            emitted, done = 0, False
            while k < len(units) and not done:
                chunk = self._ids_unit(units[k])
                k += 1
                for _ in state.push(chunk):
                    emitted += 1
                    if emitted == start_batch:
                        done = True
                        break
            if not done:
                for _ in state.drain():
                    emitted += 1
                    if emitted == start_batch:
                        done = True
                        break
                if done:
                    state.hydrate(self._gather)
                    yield from state.drain_rest()
                return
            state.hydrate(self._gather)
            yield from state.push(None)  # batches the staged rows still make
        for k in range(k, len(units)):
            for chunk in self._encode_unit(units[k]):
                yield from state.push(chunk)
        yield from state.drain()

    def _tensors(self, c: _Chunk, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        dense, cat, labels = self._encoder.unpack(c.a)
        inputs = {"dense": torch.from_numpy(dense).to(device), "categorical": torch.from_numpy(cat).to(device)}
        return inputs, torch.from_numpy(labels).to(device)

    # ------------------------------------------------------------------ random access

    def rows(self, ranges: list[tuple[int, int]]) -> Dataset:
        """The rows of the given global ``[start, stop)`` ranges, in memory (invalid rows per ``on_invalid``)."""
        parts, sources, offsets, n = [], [], [], 0
        for a, b in ranges:
            a, b = max(int(a), 0), min(int(b), self.num_rows)
            if a >= b:
                continue
            first = int(np.searchsorted(self._unit_starts, a, side="right")) - 1
            for u in self.units[first:]:
                if u.start >= b:
                    break
                lo, hi = max(a, u.start) - u.start, min(b, u.start + u.rows) - u.start
                if lo >= hi:
                    continue
                table = self._read_rows(u).slice(lo, hi - lo)
                dense, cat, labels, keep, oov = self._encoder.encode(table, self._where(u), self.on_invalid)
                self._count(table.num_rows, keep, oov)
                if keep is not None:
                    dense, cat, labels = dense[keep], cat[keep], labels[keep]
                f = self.files[u.file]
                m = len(labels)
                parts.append((dense, cat, labels))
                sources.append((str(f.path), n, n + m))
                offsets.append(u.start - f.start + lo)
                n += m
        if not n and any(a < b for a, b in ranges):
            raise DataError(f"{self.spec}: no rows left after dropping {self.stats['rows_dropped']} invalid row(s)")
        if not parts:
            dense, cat, labels = self._encoder.empty()
        else:
            dense, cat, labels = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return Dataset(torch.from_numpy(dense), torch.from_numpy(cat), torch.from_numpy(labels), sources,
                       dict(self.stats["oov"]), offsets)

    def describe(self, start: int, stop: int) -> list[dict]:
        """Which files and row ranges global rows [start, stop) come from (as Dataset.describe)."""
        out = []
        for i, f in enumerate(self.files):
            end = self.files[i + 1].start if i + 1 < len(self.files) else self.num_rows
            a, b = max(f.start, start), min(end, stop)
            if a < b:
                out.append({"file": str(f.path), "rows": [a - f.start, b - f.start]})
        return out

    def __len__(self) -> int:
        return self.num_rows


def _cut(units: list[_Unit], shards: int) -> list[list[_Unit]]:
    """``units`` (in order) cut into ``shards`` contiguous parts of equal row counts (±1)."""
    total = sum(u.rows for u in units)
    bounds = [total * s // shards for s in range(shards + 1)]
    parts: list[list[_Unit]] = [[] for _ in range(shards)]
    at = 0
    for u in units:
        for s in range(shards):
            lo, hi = max(bounds[s], at), min(bounds[s + 1], at + u.rows)
            if lo < hi:
                parts[s].append(u if (lo, hi) == (at, at + u.rows) else u.piece(lo - at, hi - at))
        at += u.rows
    return parts


class _Shuffler:
    """The shuffle buffer (cap > 0) or plain batching (cap == 0), on chunks with or without data."""

    def __init__(self, cap: int, batch: int, rng: np.random.Generator) -> None:
        self.cap, self.batch, self.rng = cap, batch, rng
        self.pool: _Chunk | None = None  # cap rows once full
        self.pool_parts: list[_Chunk] = []
        self.pool_n = 0
        self.stage: list[_Chunk] = []
        self.staged = 0
        self._drained: _Chunk | None = None  # what drain() is emptying
        self._at = 0

    def _pop_stage(self, n: int) -> _Chunk:
        out, need = [], n
        while need:
            head = self.stage[0]
            if len(head) <= need:
                out.append(self.stage.pop(0))
                need -= len(head)
            else:
                out.append(head.slice(0, need))
                self.stage[0] = head.slice(need, len(head))
                need = 0
        self.staged -= n
        return _Chunk.concat(out)

    def push(self, chunk: _Chunk | None) -> Iterator[_Chunk]:
        """Take in ``chunk`` (None: nothing new) and yield the batches that are due."""
        if chunk is not None and len(chunk) and self.pool_n < self.cap:
            take = min(self.cap - self.pool_n, len(chunk))
            self.pool_parts.append(chunk.slice(0, take))
            self.pool_n += take
            chunk = chunk.slice(take, len(chunk))
            if self.pool_n == self.cap:
                whole = _Chunk.concat(self.pool_parts)
                self.pool = _Chunk(whole.a.copy(), whole.packed)  # an own, writable copy
                self.pool_parts = []
        if chunk is not None and len(chunk):
            self.stage.append(chunk)
            self.staged += len(chunk)
        while self.staged >= self.batch:
            incoming = self._pop_stage(self.batch)
            if self.cap == 0:
                yield incoming
                continue
            slots = self.rng.choice(self.cap, self.batch, replace=False)
            out = self.pool.take(slots)
            self.pool.a[slots] = incoming.a
            yield out

    def _rest(self) -> _Chunk | None:
        parts = ([self.pool] if self.pool is not None else self.pool_parts) + self.stage
        parts = [p for p in parts if len(p)]
        return _Chunk.concat(parts) if parts else None

    def drain(self) -> Iterator[_Chunk]:
        """Everything left: the buffer and the staged rows, permuted (shuffling), in batches."""
        rest = self._rest()
        self.pool, self.pool_parts, self.pool_n, self.stage, self.staged = None, [], 0, [], 0
        if rest is None:
            return
        if self.cap:
            rest = rest.take(self.rng.permutation(len(rest)))
        self._drained = rest
        self._at = 0
        while self._at < len(rest):
            out = rest.slice(self._at, self._at + self.batch)
            self._at += self.batch
            yield out

    def hydrate(self, gather) -> None:
        """Replace id-only rows in flight by encoded ones (after skipping)."""
        if self._drained is not None and self._at < len(self._drained):
            left = self._drained.slice(self._at, len(self._drained))
            self._drained = gather(left.a)
            self._at = 0
            return
        self._drained = None
        if self.pool is not None and not self.pool.packed:
            self.pool = gather(self.pool.a)
        self.pool_parts = [p if p.packed else gather(p.a) for p in self.pool_parts]
        self.stage = [p if p.packed else gather(p.a) for p in self.stage]

    def drain_rest(self) -> Iterator[_Chunk]:
        rest, self._drained = self._drained, None
        if rest is None:
            return
        for at in range(0, len(rest), self.batch):
            yield rest.slice(at, at + self.batch)


class _Encoder:
    """Encodes Arrow tables exactly as :func:`cogradctl.data.encode`, with per-row validity."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.dense = [(f.name, float(f.mean), float(f.std)) for f in schema.dense]
        self.cats = []
        for f in schema.categorical:
            lut = None
            if f.value_type == "int" and f.vocab:
                vals = np.asarray(f.vocab, dtype=np.int64)
                lo, hi = int(vals.min()), int(vals.max())
                if hi - lo <= LUT_SPAN:
                    lut = np.zeros(hi - lo + 1, dtype=np.int64)
                    # data.encode's index_in returns the first match: keep the first index of a duplicate
                    lut[vals[::-1] - lo] = np.arange(len(vals), 0, -1, dtype=np.int64)
                    lut = (lo, lut)
            vocab = pa.array(f.vocab, type=pa.int64() if f.value_type == "int" else pa.string())
            self.cats.append((f.name, f.value_type, vocab, lut))
        self.tasks = [(t.name, t.type) for t in schema.tasks]

        c, d, k = len(self.cats), len(self.dense), len(self.tasks)
        self.offsets = (0, 8 * c, 8 * c + 4 * d, 8 * c + 4 * d + 4 * k)
        self.width = max(8, -(-self.offsets[3] // 8) * 8)  # bytes per packed row, a multiple of 8

    def pack(self, dense: np.ndarray, cat: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """N×width bytes: categorical int64, dense float32, labels float32 side by side."""
        out = np.zeros((len(labels), self.width), dtype=np.uint8)
        o = self.offsets
        for part, (a, b), dtype in ((cat, o[0:2], np.int64), (dense, o[1:3], np.float32), (labels, o[2:4], np.float32)):
            if b > a:
                out[:, a:b].view(dtype)[:] = part
        return out

    def unpack(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o = self.offsets
        return tuple(np.ascontiguousarray(rows[:, a:b]).view(dtype).reshape(len(rows), n)
                     for (a, b), dtype, n in ((o[1:3], np.float32, len(self.dense)),
                                              (o[0:2], np.int64, len(self.cats)),
                                              (o[2:4], np.float32, len(self.tasks))))

    def empty(self):
        return (np.zeros((0, len(self.dense)), np.float32), np.zeros((0, len(self.cats)), np.int64),
                np.zeros((0, len(self.tasks)), np.float32))

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

    def _labels(self, table: pa.Table, where: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        labels = np.empty((table.num_rows, len(self.tasks)), dtype=np.float32)
        bad = {}
        for k, (name, kind) in enumerate(self.tasks):
            arr = table.column(name)
            try:
                y = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowException, ValueError) as exc:
                raise DataError(f"{where}: task column '{name}' cannot be read as numbers ({_short(exc)})") from exc
            finite = np.isfinite(y)
            if not finite.all():
                bad[name] = ~finite
            if kind == "binary":
                out = finite & (y != 0) & (y != 1)
                if out.any():
                    raise DataError(
                        f"{where}: binary task column '{name}' has {int(out.sum())} value(s) outside {{0, 1}} "
                        f"(e.g. {y[out][0]:g}); declare it with --task-type {name}=regression at init if it is real-valued"
                    )
            labels[:, k] = y
        return labels, bad

    def _invalid(self, bad: dict[str, np.ndarray], n: int, where: str, on_invalid: str, label_cols: set) -> np.ndarray | None:
        if not bad:
            return None
        mask = np.zeros(n, dtype=bool)
        for m in bad.values():
            mask |= m
        if on_invalid == "error":
            what = ", ".join(
                f"{'task column' if c in label_cols else 'column'} '{c}' {int(m.sum())}" for c, m in bad.items()
            )
            raise DataError(
                f"{where}: {int(mask.sum())} invalid row(s) (NaN or infinite values, or null labels: {what}); "
                "use null for a missing feature value, or --on-invalid-rows drop to skip such rows"
            )
        return ~mask

    def valid(self, table: pa.Table, where: str) -> np.ndarray | None:
        """The keep-mask of ``table`` (None: every row valid), without encoding."""
        bad = {}
        for name, _, _ in self.dense:
            _, m = self._dense_raw(table.column(name), where, name)
            if m is not None:
                bad[name] = m
        _, lbad = self._labels(table, where)
        bad.update(lbad)
        return self._invalid(bad, table.num_rows, where, "drop", set(lbad))

    # -- encoding

    def encode(self, table: pa.Table, where: str, on_invalid: str):
        """→ (dense N×D f32, categorical N×C i64, labels N×K f32, keep mask or None, unseen per column)."""
        n = table.num_rows
        bad = {}
        dense = np.empty((n, len(self.dense)), dtype=np.float32)
        for k, (name, mean, std) in enumerate(self.dense):
            raw, m = self._dense_raw(table.column(name), where, name)
            if m is not None:
                bad[name] = m
            x = (raw - mean) / std
            np.nan_to_num(x, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # inf only in rows that get dropped
            dense[:, k] = x
        labels, lbad = self._labels(table, where)
        bad.update(lbad)
        keep = self._invalid(bad, n, where, on_invalid, set(lbad))
        cat = np.empty((n, len(self.cats)), dtype=np.int64)
        unseen = Counter()
        for k, (name, vtype, vocab, lut) in enumerate(self.cats):
            codes, missing = self._codes(table.column(name), vtype, vocab, lut, where, name)
            cat[:, k] = codes
            unseen[name] += missing  # counted over every row read, dropped ones included
        return dense, cat, labels, keep, unseen

    def _codes(self, arr, vtype: str, vocab: pa.Array, lut, where: str, name: str) -> tuple[np.ndarray, int]:
        """Vocabulary indices + 1 (0: null or unseen) and the number of unseen non-null values."""
        try:
            if isinstance(arr, pa.ChunkedArray):
                arr = arr.combine_chunks()
            if pa.types.is_dictionary(arr.type):
                dict_codes, _ = self._codes(arr.dictionary, vtype, vocab, lut, where, name)
                idx = arr.indices
                codes = dict_codes[idx.fill_null(0).to_numpy(zero_copy_only=False)] if len(dict_codes) else np.zeros(len(arr), np.int64)
                if idx.null_count:
                    codes = np.where(idx.is_valid().to_numpy(zero_copy_only=False), codes, 0)
                unseen = int((codes == 0).sum()) - arr.null_count
                return codes.astype(np.int64, copy=False), unseen
            if lut is not None and (pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type)):
                lo, table = lut
                values = arr.cast(pa.int64()) if not pa.types.is_boolean(arr.type) else arr.cast(pa.int8()).cast(pa.int64())
                v = values.fill_null(lo - 1).to_numpy(zero_copy_only=False) - lo
                inside = (v >= 0) & (v < len(table))
                codes = np.where(inside, table[np.clip(v, 0, len(table) - 1)], 0)
                if values.null_count:
                    codes = np.where(values.is_valid().to_numpy(zero_copy_only=False), codes, 0)
                return codes, int((codes == 0).sum()) - values.null_count
            values, _ = _categorical_values(pa.chunked_array([arr]), vtype)
            idx = pc.index_in(values, value_set=vocab)
            codes = pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
            return codes, idx.null_count - values.null_count
        except (pa.ArrowException, ValueError, TypeError, IndexError) as exc:
            raise DataError(f"{where}: categorical column '{name}' cannot be encoded ({_short(exc)})") from exc
