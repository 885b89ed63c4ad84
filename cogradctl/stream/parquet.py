""":class:`ParquetStream`: the files (:mod:`.files`), the encoder (:mod:`.encode`) and the shuffle
buffer (:mod:`.shuffle`) tied together into an epoch of batches and into random access by global
row ranges. The overview is the package's docstring, :mod:`cogradctl.stream`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from cogradctl.batch import split
from cogradctl.data import Dataset, truncation_message, unseen_message
from cogradctl.errors import DataError, UsageError
from cogradctl.labels import PLAIN, LabelOptions
from cogradctl.schema import Schema
from cogradctl.stream.encode import Encoder, UnitEncoder
from cogradctl.stream.files import Unit, carry_type, coalesce, cut, read_rows, read_unit, scan, with_carry
from cogradctl.stream.shuffle import Chunk, Shuffler, shard_batches

ON_INVALID = ("error", "drop")


class ParquetStream:
    """Parquet files read as a stream of encoded batches; see :mod:`cogradctl.stream`."""

    def __init__(
        self,
        spec: str,
        schema: Schema,
        *,
        on_invalid: str = "error",
        shuffle_buffer: int = 65536,
        labels: bool = True,
        label_options: LabelOptions = PLAIN,
    ) -> None:
        """``labels=False`` (prediction): only the feature columns are required and read, only
        invalid features make a row invalid, and the label matrices are B×0. ``label_options``:
        null labels and the weight column (:mod:`cogradctl.labels`: the label matrix's layout)."""
        if on_invalid not in ON_INVALID:
            raise UsageError(f"--on-invalid-rows {on_invalid!r}: expected one of {', '.join(ON_INVALID)}")
        if shuffle_buffer < 0:
            raise UsageError(f"--shuffle-buffer must be at least 0, got {shuffle_buffer}")
        self.spec, self.schema, self.on_invalid, self.shuffle_buffer = spec, schema, on_invalid, int(shuffle_buffer)
        self.stats: dict = {
            "rows_read": 0,
            "rows_dropped": 0,
            "oov": {},
            "oov_distinct": {},
            "oov_distinct_capped": [],
            "truncated": {},  # sequence column → rows whose list was cut to max_len
            "labels_masked": {},  # per task: labels not observed in the rows used (--missing-labels mask)
        }
        self.labels = labels
        self.label_options = label_options.check(schema) if labels else PLAIN
        read = schema if labels else Schema(schema.features, [])
        self._encoder = Encoder(read, self.label_options)
        self.files, units, self.num_rows = scan(spec, read, self.label_options.extra)
        self.units = coalesce(units)  # small row groups read as one unit (docs/data.md)
        if self.num_rows == 0:
            raise DataError(f"{spec}: the data has no rows")
        self._read = UnitEncoder(self._encoder, self.files, self.units, on_invalid, self.stats)

    # ------------------------------------------------------------------ batches

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        device: torch.device | str = "cpu",
        shards: int = 1,
        take: tuple[int, ...] = (0,),
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """One epoch of (inputs {"dense", "categorical"}, labels B×K, or B×(K+1) with a weight column);
        the last batch may be smaller.

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
        cap = max(self.shuffle_buffer, batch_size) if shuffle else 0

        def shard(units: list[Unit], rng: np.random.Generator) -> Iterator[Chunk]:
            shuffler = Shuffler(cap, batch_size, rng)
            return shard_batches(units, shuffler, self._read.ids, self._read.encoded, self._read.gather, start_batch)

        if shards == 1:
            streams = [shard(units, rng)]
        else:
            parts = cut(units, shards)
            streams = [shard(parts[s], np.random.default_rng([int(seed), int(epoch), 0x5EED, shards, s])) for s in take]
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
                out = Chunk.concat(chunks)
                total += len(out)
                yield self._tensors(out, device)
        if total == 0 and start_batch == 0 and len(take) == shards:  # this process holds every shard
            raise DataError(f"{self.spec}: no rows left after dropping {self.stats['rows_dropped']} invalid row(s)")

    def _tensors(self, c: Chunk, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        dense, cat, labels = self._encoder.unpack(c.a)
        inputs = split(torch.from_numpy(dense).to(device), torch.from_numpy(cat).to(device), self.schema)
        return inputs, torch.from_numpy(labels).to(device)

    # ------------------------------------------------------------------ in order, with columns carried

    def carried(self, columns: Sequence[str]) -> pa.Schema:
        """The Arrow schema of ``columns`` as :meth:`in_order` carries them: each must be in every
        file (stored, or a hive partition key) with one type across the files; a DataError naming
        the file and column otherwise. Footers only: nothing is read."""
        found: dict[str, tuple[pa.DataType, str]] = {}
        for f in self.files:
            for name in columns:
                t = carry_type(f, name)
                first, where = found.setdefault(name, (t, str(f.path)))
                if t != first:
                    raise DataError(f"{f.path}: column '{name}' is {t}, in {where} it is {first}; it needs one type")
        return pa.schema([pa.field(c, found[c][0]) for c in columns])

    def in_order(self, carry: Sequence[str] = ()) -> Iterator[tuple[np.ndarray, np.ndarray, pa.Table]]:
        """Every row once, in the global order (files sorted, rows in file order), one record batch
        of up to READ_ROWS rows at a time: (dense N×D float32, categorical N×C int64, the ``carry``
        columns of the same rows with the types :meth:`carried` gives). Rows are encoded, raised or
        dropped, and counted in ``stats`` exactly as :meth:`batches` does; labels are not returned."""
        carry = list(carry)
        types = self.carried(carry)
        for u in self.units:
            f = with_carry(self.files[u.file], carry) if carry else self.files[u.file]
            at = self._read.where(u)
            for _, table in read_unit(f, u):
                dense, cat, _, keep, oov, truncated = self._encoder.encode(table, at, self.on_invalid)
                self._read.count(table.num_rows, keep, oov, truncated)
                kept = table.select(carry).cast(types)  # a categorical string feature is read dictionary-encoded
                if keep is not None:
                    dense, cat, kept = dense[keep], cat[keep], kept.filter(keep)
                yield dense, cat, kept

    # ------------------------------------------------------------------ random access

    def rows(self, ranges: list[tuple[int, int]]) -> Dataset:
        """The rows of the given global ``[start, stop)`` ranges, in memory (invalid rows per ``on_invalid``)."""
        parts, sources, offsets, n = [], [], [], 0
        for a, b in ranges:
            a, b = max(int(a), 0), min(int(b), self.num_rows)
            if a >= b:
                continue
            first = int(np.searchsorted(self._read.starts, a, side="right")) - 1
            for u in self.units[first:]:
                if u.start >= b:
                    break
                lo, hi = max(a, u.start) - u.start, min(b, u.start + u.rows) - u.start
                if lo >= hi:
                    continue
                f = self.files[u.file]
                dense, cat, labels = self._read.encode(read_rows(f, u).slice(lo, hi - lo), self._read.where(u))
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
        return Dataset(
            torch.from_numpy(dense),
            torch.from_numpy(cat),
            torch.from_numpy(labels),
            sources,
            dict(self.stats["oov"]),
            offsets,
            dict(self.stats["oov_distinct"]),
            self.schema,
        )

    def unseen_warning(self) -> str | None:
        """The warning for the categorical values read so far that are not in the vocabulary: per column
        the rows and the distinct values (None when there were none)."""
        rows = {c: n for c, n in self.stats["oov"].items() if n}
        if not rows:
            return None
        return unseen_message(self.spec, rows, self.stats["oov_distinct"], self.stats["oov_distinct_capped"])

    def truncation_warning(self) -> str | None:
        """The warning for the sequence lists read so far that were cut to their feature's max_len."""
        cut = {f.name: (n, f.max_len) for f in self.schema.sequences if (n := self.stats["truncated"].get(f.name, 0))}
        return truncation_message(self.spec, cut) if cut else None

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
