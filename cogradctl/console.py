"""Where logs and progress go: stderr, never stdout (stdout carries data only).

Progress bars appear only when stderr is a terminal and ``--quiet`` is not set, so cron logs stay
clean; log lines are suppressed by ``--quiet`` too (errors never are).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class Log:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            stderr.print(message, markup=False)

    def warn(self, message: str) -> None:
        stderr.print(f"warning: {message}", markup=False, style="yellow")

    @contextmanager
    def progress(self, description: str, total: int):
        """Yields ``advance(n=1, **fields)``; draws a bar only on a TTY and when not quiet."""
        if self.quiet or not sys.stderr.isatty():
            yield lambda n=1, **fields: None
            return
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with Progress(*columns, console=stderr, transient=True) as bar:
            task = bar.add_task(description, total=total, info="")
            yield lambda n=1, **fields: bar.update(
                task, advance=n, info=" ".join(f"{k}={v}" for k, v in fields.items())
            )


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun, singular for 1: "1 step", "5 steps", "1 epoch"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
