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
        help="Rows with NaN/infinite features or labels, or null labels: "
        "error (exit 2, with a count) or drop (skip them, log the count).",
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


def open_data(spec: str, schema, log: Log, on_invalid: str = "error", shuffle_buffer: int = 65536):
    """A ParquetStream over ``spec`` (files validated from their footers; nothing read yet)."""
    from cogradctl.stream import ParquetStream

    return ParquetStream(spec, schema, on_invalid=on_invalid, shuffle_buffer=shuffle_buffer)


def report_data(stream, log: Log) -> None:
    """Log what reading the stream dropped (--on-invalid-rows drop) and mapped to the OOV bucket."""
    dropped = stream.stats.get("rows_dropped", 0)
    if dropped:
        log.warn(
            f"{stream.spec}: dropped {dropped} invalid row(s) "
            "(NaN/infinite values or null labels; --on-invalid-rows drop)"
        )
    unseen = stream.unseen_warning()  # per column: rows and distinct values not in the vocabulary
    if unseen:
        log.warn(unseen)
    cut = stream.truncation_warning()
    if cut:
        log.warn(cut)
