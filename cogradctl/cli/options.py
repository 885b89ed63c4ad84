"""Options that several commands share, and the small parsers and data helpers behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cogradctl.console import Log

Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No log lines or progress bars on stderr.")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
Seed = Annotated[int, typer.Option(help="Random seed (same seed and data → same results).")]
PluginPath = Annotated[
    list[Path] | None,
    typer.Option(
        "--plugin-path",
        help="Folder of plugin .py files (repeatable; also COGRADCTL_PLUGIN_PATH).",
        show_default=False,
    ),
]
OnInvalid = Annotated[
    str,
    typer.Option(
        "--on-invalid-rows",
        help="Rows with NaN/infinite features or labels: error (exit 2, with a count) or drop (skip them, log the count).",
    ),
]
MissingLabels = Annotated[
    str,
    typer.Option(
        "--missing-labels",
        help="A null label: mask (not observed: that task's loss and metrics leave the row out, the others "
        "keep it; counted), drop (drop the row, counted) or error (the row is invalid, as --on-invalid-rows says).",
    ),
]
WeightColumn = Annotated[
    str | None,
    typer.Option(
        "--weight-column",
        help="A numeric column weighting each row's loss and metrics (finite, ≥ 0; not a feature of the schema).",
        show_default=False,
    ),
]


def finite(name: str, value, minimum: float | None = None, maximum: float | None = None, *, above: bool = False):
    """An option's number checked before anything runs: finite (never NaN or ±inf), at least
    ``minimum`` (or above it, with ``above``) and at most ``maximum``; → the value, or a UsageError
    (exit 2) naming the option, e.g. ``finite("--lookahead-lr", lr, 0, above=True)``."""
    import math

    from cogradctl.errors import UsageError

    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise UsageError(f"{name} must be {'>' if above else '≥'} {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be ≤ {maximum:g}, got {value!r}")
    return value


def count(name: str, value, minimum: int = 1, maximum: int = 2**63 - 1):
    """An integer option in [minimum, maximum] (None passes); → the value, or a UsageError naming it."""
    from cogradctl.errors import UsageError

    if value is not None and not minimum <= value <= maximum:
        raise UsageError(f"{name} must be an integer in [{minimum}, {maximum}], got {value}")
    return value


def paths(plugin_path: list[Path] | None) -> list[str]:
    """``--plugin-path`` values as the library takes them."""
    return [str(p) for p in plugin_path or []]


def csv_list(value: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [v.strip() for v in value.split(",") if v.strip()]


def label_options(missing_labels: str = "mask", weight_column: str | None = None):
    """--missing-labels and --weight-column as the library takes them (checked: a UsageError names the option)."""
    from cogradctl.labels import LabelOptions

    return LabelOptions(missing_labels, weight_column).check()


def open_data(spec: str, schema, log: Log, on_invalid: str = "error", shuffle_buffer: int = 65536, labels=None):
    """A ParquetStream over ``spec`` (files validated from their footers; nothing read yet);
    ``labels``: :func:`label_options` (default: null labels masked, no weights)."""
    from cogradctl.labels import PLAIN
    from cogradctl.stream import ParquetStream

    return ParquetStream(
        spec, schema, on_invalid=on_invalid, shuffle_buffer=shuffle_buffer, label_options=labels or PLAIN
    )


def report_data(stream, log: Log) -> None:
    """Log what reading the stream dropped (--on-invalid-rows drop) and mapped to the OOV bucket."""
    dropped = stream.stats.get("rows_dropped", 0)
    if dropped:
        log.warn(f"{stream.spec}: dropped {dropped} invalid row(s) ({_drop_reasons(stream)})")
    unseen = stream.unseen_warning()  # per column: rows and distinct values not in the vocabulary
    if unseen:
        log.warn(unseen)
    cut = stream.truncation_warning()
    if cut:
        log.warn(cut)
    masked = stream.stats.get("labels_masked")
    if masked:
        listed = "; ".join(f"{t}: {n}" for t, n in masked.items())
        log.info(f"{stream.spec}: null labels masked per task (not observed; --missing-labels mask): {listed}")


def _drop_reasons(stream) -> str:
    """Why the stream's rows may have been dropped, in the options' words."""
    reasons = []
    if stream.on_invalid == "drop":
        reasons.append("NaN/infinite values; --on-invalid-rows drop")
    if stream.label_options.missing == "drop":
        reasons.append("null labels; --missing-labels drop")
    elif stream.label_options.missing == "error" and stream.on_invalid == "drop":
        reasons[0] = "NaN/infinite values or null labels; --on-invalid-rows drop"
    return ", ".join(reasons) or "invalid rows"
