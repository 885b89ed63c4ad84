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
    unseen = {c: n for c, n in stream.stats.get("oov", {}).items() if n}
    if unseen:
        listed = ", ".join(f"{c}: {n}" for c, n in sorted(unseen.items()))
        log.warn(f"{stream.spec}: categorical values not seen at init were mapped to the OOV bucket ({listed})")
