"""The shuffle buffer, and the rows it moves.

Shuffling (``shuffle=True``) is two-level and deterministic for a given ``(seed, epoch)``:

1. the order of all units (row groups, small ones coalesced: :func:`.files.coalesce`) is permuted
   with the seed;
2. rows pass through a buffer of ``shuffle_buffer`` rows: once it is full, each batch is
   ``batch_size`` rows drawn uniformly without replacement from the buffer, and their places are
   taken by the next ``batch_size`` rows read. At the end the buffer is permuted and emptied.

The first step is :meth:`cogradctl.stream.ParquetStream.batches`'s; this module holds the second,
:class:`Shuffler`, and :func:`shard_batches`, which runs one shard's units through it and resumes
at a given batch exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from cogradctl.stream.files import Unit


class Chunk:
    """Rows in flight: global row ids (while skipping), or encoded rows packed one row per line of
    bytes (categorical int64, dense float32, labels float32), so that the shuffle buffer moves each
    row with one memory access instead of one per array."""

    __slots__ = ("a", "packed")

    def __init__(self, a: np.ndarray, packed: bool = False):
        self.a, self.packed = a, packed

    def __len__(self) -> int:
        return len(self.a)

    def slice(self, a: int, b: int) -> Chunk:
        return Chunk(self.a[a:b], self.packed)

    def take(self, index) -> Chunk:
        return Chunk(self.a.take(index, axis=0), self.packed)

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        return Chunk(np.concatenate([c.a for c in chunks]), chunks[0].packed)


class Shuffler:
    """The shuffle buffer (cap > 0) or plain batching (cap == 0), on chunks with or without data."""

    def __init__(self, cap: int, batch: int, rng: np.random.Generator) -> None:
        self.cap, self.batch, self.rng = cap, batch, rng
        self.pool: Chunk | None = None  # cap rows once full
        self.pool_parts: list[Chunk] = []
        self.pool_n = 0
        self.stage: list[Chunk] = []
        self.staged = 0
        self._drained: Chunk | None = None  # what drain() is emptying
        self._at = 0

    def _pop_stage(self, n: int) -> Chunk:
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
        return Chunk.concat(out)

    def push(self, chunk: Chunk | None) -> Iterator[Chunk]:
        """Take in ``chunk`` (None: nothing new) and yield the batches that are due."""
        if chunk is not None and len(chunk) and self.pool_n < self.cap:
            take = min(self.cap - self.pool_n, len(chunk))
            self.pool_parts.append(chunk.slice(0, take))
            self.pool_n += take
            chunk = chunk.slice(take, len(chunk))
            if self.pool_n == self.cap:
                whole = Chunk.concat(self.pool_parts)
                self.pool = Chunk(whole.a.copy(), whole.packed)  # an own, writable copy
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

    def _rest(self) -> Chunk | None:
        parts = ([self.pool] if self.pool is not None else self.pool_parts) + self.stage
        parts = [p for p in parts if len(p)]
        return Chunk.concat(parts) if parts else None

    def drain(self) -> Iterator[Chunk]:
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

    def drain_rest(self) -> Iterator[Chunk]:
        rest, self._drained = self._drained, None
        if rest is None:
            return
        for at in range(0, len(rest), self.batch):
            yield rest.slice(at, at + self.batch)


def shard_batches(
    units: list[Unit],
    shuffler: Shuffler,
    ids: Callable[[Unit], Chunk],
    encoded: Callable[[Unit], Iterable[Chunk]],
    gather: Callable[[np.ndarray], Chunk],
    start_batch: int = 0,
) -> Iterator[Chunk]:
    """The batches (encoded chunks) of one shard: ``units`` in this order through ``shuffler``.

    ``encoded(unit)`` gives a unit's encoded chunks, ``ids(unit)`` the ids of its valid rows as one
    chunk without encoding them, ``gather(ids)`` the encoded rows for global ids (any order). The
    first ``start_batch`` batches are skipped exactly: the rows they held are not encoded.
    """
    k = 0
    if start_batch:
        # Skipping replays the same algorithm on row ids only: the random draws depend on row
        # counts alone, so the rows in flight afterwards are exactly those of the full run.
        emitted, done = 0, False
        while k < len(units) and not done:
            chunk = ids(units[k])
            k += 1
            for _ in shuffler.push(chunk):
                emitted += 1
                if emitted == start_batch:
                    done = True
                    break
        if not done:
            for _ in shuffler.drain():
                emitted += 1
                if emitted == start_batch:
                    done = True
                    break
            if done:
                shuffler.hydrate(gather)
                yield from shuffler.drain_rest()
            return
        shuffler.hydrate(gather)
        yield from shuffler.push(None)  # batches the staged rows still make
    for unit in units[k:]:
        for chunk in encoded(unit):
            yield from shuffler.push(chunk)
    yield from shuffler.drain()
