"""Stream Parquet into model-ready batches with bounded memory (docs/data.md).

``ParquetStream(spec, schema)`` resolves ``spec`` (a file, a directory, a glob, or hive-partitioned
directories such as ``'events/date=2026-11-*'``) and validates every file's Arrow schema up front
from the Parquet footers alone. :meth:`ParquetStream.batches` then reads one row group at a time,
only the columns the schema needs, in record batches, and encodes them exactly as
:func:`cogradctl.data.encode` does.

Shuffling (``shuffle=True``) is two-level and deterministic for a given ``(seed, epoch)``:

1. the order of all units (a row group, or a run of consecutive row groups of one file of fewer
   than ``SMALL_GROUP`` rows each, coalesced into up to READ_ROWS rows) is permuted with the seed;
2. rows pass through a buffer of ``shuffle_buffer`` rows: once it is full, each batch is
   ``batch_size`` rows drawn uniformly without replacement from the buffer, and their places are
   taken by the next ``batch_size`` rows read. At the end the buffer is permuted and emptied.

Memory is bounded by the buffer, one record batch of the row group being read and one output batch;
nothing is ever materialised whole. Rows are numbered globally: files in sorted order, rows in
file order; :meth:`ParquetStream.rows` reads given global row ranges into a :class:`Dataset`.
:meth:`ParquetStream.in_order` reads every row once in that order with other columns carried
along (``cogradctl predict``), and ``labels=False`` reads data without the label columns.

Invalid rows (NaN or infinite dense features or labels, null labels) are an error naming the file,
row group and column (``on_invalid="error"``), or are dropped and counted (``"drop"``). Binary
labels outside {0, 1} are always an error (the task type is wrong, not the row). Categorical values
not in the vocabulary (index 0) are counted per column in ``stats``: ``oov`` (rows), ``oov_distinct``
(distinct values) and ``oov_distinct_capped``; :meth:`ParquetStream.unseen_warning` says it in words.

Modules:

- :mod:`.files`: resolving ``spec``, footer validation, hive partitions, reading a row group (or a
  piece of one) in record batches, cutting the units into data shards;
- :mod:`.encode`: :class:`Encoder`, Arrow tables to arrays with per-row validity, and the packed
  row layout the shuffle buffer moves; :class:`UnitEncoder`, a unit's rows as such chunks (encoded,
  ids only, or gathered by global ids), invalid rows counted;
- :mod:`.shuffle`: :class:`Chunk` (rows in flight), :class:`Shuffler` (the buffer) and
  :func:`shard_batches` (one shard's units through it, resuming at a given batch);
- :mod:`.parquet`: :class:`ParquetStream`, which ties them together.

The names of the former module ``cogradctl/stream.py`` still import from here: ``ParquetStream``,
``ON_INVALID``, ``READ_ROWS``, ``LUT_SPAN``, ``partitions``; its private helpers are public within
the package, without the leading underscore (``_Unit`` → :class:`Unit`, ``_cut`` → :func:`cut`, …).
"""

from cogradctl.encodings import LUT_SPAN
from cogradctl.stream.encode import Encoder, UnitEncoder
from cogradctl.stream.files import READ_ROWS, File, Unit, cut, partition_array, partitions
from cogradctl.stream.parquet import ON_INVALID, ParquetStream
from cogradctl.stream.shuffle import Chunk, Shuffler, shard_batches

__all__ = [
    "LUT_SPAN",
    "ON_INVALID",
    "READ_ROWS",
    "Chunk",
    "Encoder",
    "File",
    "ParquetStream",
    "Shuffler",
    "Unit",
    "UnitEncoder",
    "cut",
    "partition_array",
    "partitions",
    "shard_batches",
]
