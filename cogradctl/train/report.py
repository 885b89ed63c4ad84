"""What a run tells its user about its data and its progress, besides the per-step records.

* :func:`count_rows`: the rows of ``--data`` or ``--valid`` that ``--on-invalid-rows drop`` will
  drop, counted before the run starts (per column, by reason), so that the start line, the number of
  steps, the learning-rate schedule, the warning, ``metrics.jsonl`` and ``train --json`` state the
  rows actually used;
* :class:`OovCount`: categorical values unseen at ``init`` (the stream's ``oov`` counts), over the
  first epoch this process reads in full (or over the rows read, if the run ends before one);
* :class:`ProgressLine`: a periodic log line on stderr when it is not a terminal (cron, CI, a pipe),
  where the progress bar is not drawn;
* :func:`duration`: seconds as text ("2m05s").
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogradctl.console import Log, counted
from cogradctl.data import unseen_message
from cogradctl.errors import DataError
from cogradctl.labels import weights_of
from cogradctl.schema import is_list_type
from cogradctl.stream import ParquetStream
from cogradctl.stream.encode import Encoder
from cogradctl.stream.files import read_unit, where

PROGRESS_EVERY_S = 30.0  # a progress line on a non-terminal stderr at most this often …
PROGRESS_GAP_S = 5.0  # … and at each epoch end, unless the last line is more recent than this


def duration(seconds: float) -> str:
    """Seconds as text: 4.2s, 2m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


# ---------------------------------------------------------------------------- invalid rows


def count_rows(stream: ParquetStream, on_invalid: str) -> dict:
    """``{"path", "rows", "rows_dropped", "rows_used", "invalid"}`` of the stream's data, where
    ``invalid`` is ``{column: {"null"|"nan"|"inf": values}}`` (a dropped row counts once in
    ``rows_dropped`` and under every column that makes it invalid).

    With ``--on-invalid-rows drop`` (or ``--missing-labels drop``) every row is read once, its
    dense features, labels and weight only, and judged as the stream judges it (the same
    :meth:`Encoder.valid`), so ``rows_used`` is what training sees; a DataError if no row is left
    (the stream's own message). Otherwise nothing is read: the rows are all used, or the run stops
    at the first invalid one (exit 2). A null label masked (``--missing-labels mask``) is no reason."""
    out = {"path": stream.spec, "rows": stream.num_rows, "rows_dropped": 0, "rows_used": stream.num_rows, "invalid": {}}
    schema, options = stream.schema, stream.label_options
    encoder = Encoder(schema, options)
    if not encoder.drops(on_invalid):
        check_weights(stream)
        return out
    dense = [f.name for f in schema.dense + schema.vectors]
    labels = [t.name for t in schema.tasks]
    needed = set(dense) | set(labels) | set(options.extra)
    invalid: dict[str, dict[str, int]] = {}
    dropped = 0
    for u in stream.units:
        f = stream.files[u.file]
        f = replace(
            f,
            columns=[c for c in f.columns if c in needed],
            constants={k: v for k, v in f.constants.items() if k in needed},
            dictionary=[],
        )
        for _, table in read_unit(f, u):
            keep = encoder.valid(table, where(f, u), on_invalid)
            if keep is None:
                continue
            dropped += int((~keep).sum())
            for name in dense + labels:
                null = name in labels and options.missing != "mask"  # a null label that drops its row
                for reason, n in _bad_values(table.column(name), label=null).items():
                    column = invalid.setdefault(name, {})
                    column[reason] = column.get(reason, 0) + n
    invalid = {c: invalid[c] for c in dense + labels if c in invalid}  # in the schema's order
    out.update(rows_dropped=dropped, rows_used=stream.num_rows - dropped, invalid=invalid)
    if not out["rows_used"]:
        raise DataError(f"{stream.spec}: no rows left after dropping {dropped} invalid row(s)")
    return out


def check_weights(stream: ParquetStream) -> None:
    """Read the weight column (--weight-column) of every row once, before the run: a null, NaN,
    infinite or negative weight is a DataError naming the file, row group and column before
    anything is written (otherwise it would stop the run where the stream meets it)."""
    weight = stream.label_options.weight
    if weight is None:
        return
    for u in stream.units:
        f = stream.files[u.file]
        f = replace(
            f,
            columns=[c for c in f.columns if c == weight],
            constants={k: v for k, v in f.constants.items() if k == weight},
            dictionary=[],
        )
        for _, table in read_unit(f, u):
            weights_of(table.column(weight), where(f, u), weight)


def _bad_values(column, label: bool) -> dict[str, int]:
    """Values that make a row invalid: NaN or infinite numbers, and nulls in a label column (a null
    feature is a missing value, which is fine)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if is_list_type(column.type):  # a vector: its values
        column = pc.list_flatten(column)
    raw = column.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls → NaN
    nulls = column.null_count
    counts = {"null": nulls if label else 0, "nan": int(np.isnan(raw).sum()) - nulls, "inf": int(np.isinf(raw).sum())}
    return {k: v for k, v in counts.items() if v}


REASONS = {"null": "null", "nan": "NaN", "inf": "infinite"}


def dropped_text(counts: dict, labels: list[str]) -> str:
    """The invalid values per column: column 'f1' 2 NaN; task column 'like' 4235 null."""
    parts = []
    for name, reasons in counts["invalid"].items():
        kind = "task column" if name in labels else "column"
        parts.append(f"{kind} '{name}' " + ", ".join(f"{n} {REASONS[r]}" for r, n in reasons.items()))
    return "; ".join(parts)


def warn_dropped(
    log: Log, counts: dict, labels: list[str], role: str, use: str, why: str = "--on-invalid-rows drop"
) -> None:
    """The warning for rows dropped (nothing if none): counts, columns, reasons; ``why``: the options that drop."""
    if not counts["rows_dropped"]:
        return
    share = counts["rows_dropped"] / counts["rows"]
    log.warn(
        f"{role} {counts['path']}: dropped {counts['rows_dropped']} of {counts['rows']} rows ({share:.1%}; "
        f"{why}): {dropped_text(counts, labels)}; {use} the other {counts['rows_used']}"
    )


# ---------------------------------------------------------------------------- unseen categorical values


class OovCount:
    """Categorical values unseen at ``init`` in the training data, from the stream's counts (every
    row read is counted, dropped ones included): over the first epoch this process reads from its
    first batch (the exact counts of one pass over the data), or, if the run ends before such an
    epoch ends, over the rows read so far. Distributed, the rows of every process are summed and
    the distinct values are the largest count of one process (a lower bound)."""

    def __init__(self, stream: ParquetStream) -> None:
        self.stream = stream
        # (rows read, oov rows per column, truncated rows per sequence column, masked labels per task)
        # when the counted epoch began
        self.base = (0, {}, {}, {})
        self.full = False  # the epoch being counted began at its first batch
        self.first = True  # the epoch being counted is this process's first
        self.result: dict | None = None

    def epoch_begins(self, batch: int) -> None:
        """Called as each epoch's batches begin (``batch``: the position in it). The first epoch's
        first batch was read before, with the inputs: its base is the empty count."""
        if self.result is not None:
            return
        if not self.first:
            stats = self.stream.stats
            self.base = (
                stats["rows_read"],
                dict(stats["oov"]),
                dict(stats.get("truncated", {})),
                dict(stats.get("labels_masked", {})),
            )
        self.full, self.first = batch == 0, False

    def take(self, dist, epoch: int, epoch_end: bool) -> dict | None:
        """The counts, once: at the end (``epoch_end``) of an epoch read in full, else at the end of
        the run, over the rows read (``"epoch"`` None). Every process calls it at the same points.
        The distinct values are those of every row this process has read (the same values
        again in each epoch: after a whole epoch, the data's)."""
        if self.result is not None or (epoch_end and not self.full):
            return None
        stats = self.stream.stats
        rows = stats["rows_read"] - self.base[0]
        oov = {c: n - self.base[1].get(c, 0) for c, n in stats["oov"].items()}
        cut = {c: n - self.base[2].get(c, 0) for c, n in stats.get("truncated", {}).items()}
        masked = {t: n - self.base[3].get(t, 0) for t, n in stats.get("labels_masked", {}).items()}
        gathered = (rows, oov, dict(stats["oov_distinct"]), list(stats["oov_distinct_capped"]), cut, masked)
        parts = dist.gather([gathered])
        total: dict[str, int] = {}
        distinct: dict[str, int] = {}
        truncated: dict[str, int] = {}
        at_least = set()
        labels_masked: dict[str, int] = {}
        for _, counts, seen, capped, cuts, part_masked in parts:
            for c, n in cuts.items():
                truncated[c] = truncated.get(c, 0) + n
            for t, n in part_masked.items():
                labels_masked[t] = labels_masked.get(t, 0) + n
            for c, n in counts.items():
                total[c] = total.get(c, 0) + n
            for c, n in seen.items():
                distinct[c] = max(distinct.get(c, 0), n)
            at_least.update(capped)
        columns = {c: n for c, n in sorted(total.items()) if n}
        if dist.world > 1:
            at_least.update(columns)
        self.result = {
            "rows_read": sum(part[0] for part in parts),
            "epoch": epoch if epoch_end else None,
            "columns": columns,
            "distinct": {c: distinct.get(c, 0) for c in columns},
            "distinct_at_least": sorted(c for c in at_least if c in columns),
            "truncated": {c: n for c, n in sorted(truncated.items()) if n},  # sequence lists cut to max_len
            "labels_masked": {t: n for t, n in labels_masked.items() if n},  # in the rows used of those read
        }
        return self.result


def stream_oov(stream: ParquetStream) -> dict:
    """A stream's unseen values as :class:`OovCount` gives them (--valid, after one pass)."""
    stats = stream.stats
    columns = {c: n for c, n in sorted(stats["oov"].items()) if n}
    return {
        "rows_read": stats["rows_read"],
        "columns": columns,
        "distinct": {c: stats["oov_distinct"].get(c, 0) for c in columns},
        "distinct_at_least": sorted(c for c in stats["oov_distinct_capped"] if c in columns),
    }


def masked_text(path: str, role: str, masked: dict[str, int], rows: int, when: str = "") -> str | None:
    """The line for labels not observed (None if every label was): per task, the labels masked
    out of the rows read (--missing-labels mask: each task's loss and metrics leave them out)."""
    if not masked:
        return None
    listed = "; ".join(f"{t}: {counted(n, 'label')}" for t, n in masked.items())
    return (
        f"{role} {path}: null labels masked (not observed; --missing-labels mask, each task's loss uses its "
        f"observed rows only): {listed} (of {counted(rows, 'row')} read{when})"
    )


def oov_text(path: str, role: str, counts: dict, when: str = "") -> str | None:
    """The warning for unseen values (None if there are none), as ``evaluate`` words it
    (:func:`cogradctl.data.unseen_message`: per column the rows and the distinct values), with
    the role of the data and, for ``--data``, which rows were counted."""
    if not counts["columns"]:
        return None
    text = unseen_message(f"{role} {path}", counts["columns"], counts["distinct"], counts["distinct_at_least"])
    return f"{text} (of {counts['rows_read']} rows read{when})"


# ---------------------------------------------------------------------------- progress


class ProgressLine:
    """A log line on stderr every PROGRESS_EVERY_S seconds and at each epoch end, when stderr is
    not a terminal (a terminal gets the progress bar instead) and the run is not quiet: steps
    done of the total, epoch, the mean summed loss and the rows per second since the last line,
    the time elapsed in this session and the time left at its mean rate. An epoch's end is not
    logged within PROGRESS_GAP_S of the last line (short epochs would flood the log)."""

    def __init__(self, log: Log, total: int, epochs: int, world: int) -> None:
        self.log, self.total, self.epochs, self.world = log, total, epochs, world
        self.on = not log.quiet and not sys.stderr.isatty()
        self.last = self.began = time.monotonic()
        self.rows = self.steps = self.done = 0  # rows and steps since the last line; steps before it
        self.loss, self.losses = 0.0, 0

    def step(self, step: int, epoch: int, rows: int, loss: float | None) -> None:
        if not self.on:
            return
        self.steps += 1
        self.rows += rows * self.world
        if loss is not None and math.isfinite(loss):
            self.loss += loss
            self.losses += 1
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self._line(f"step {step}/{self.total} (epoch {epoch}/{self.epochs})", step)

    def epoch_end(self, step: int, epoch: int) -> None:
        if self.on and self.done + self.steps and time.monotonic() - self.last >= PROGRESS_GAP_S:
            self._line(f"epoch {epoch}/{self.epochs} done: step {step}/{self.total}", step)

    def _line(self, head: str, step: int) -> None:
        now = time.monotonic()
        parts = [head]
        if self.losses:
            parts.append(f"loss {self.loss / self.losses:.4f} (task sum, mean of {counted(self.losses, 'step')})")
        if self.steps:
            parts.append(f"{self.rows / max(now - self.last, 1e-9):,.0f} rows/s")
        parts.append(f"{duration(now - self.began)} elapsed")
        self.done += self.steps
        if step < self.total and self.done:  # at this session's mean rate
            parts.append(f"about {duration((self.total - step) * (now - self.began) / self.done)} left")
        self.log.info(", ".join(parts))
        self.last = now
        self.rows = self.steps = self.losses = 0
        self.loss = 0.0
