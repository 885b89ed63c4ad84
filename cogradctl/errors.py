"""The error table: every failure a user can act on is one of these, each with its exit code.

The CLI catches them, prints one line to stderr and exits with ``exit_code``. Anything else is a bug
and exits 1 (with a traceback only under ``--debug`` or ``COGRADCTL_DEBUG=1``).

| exit | meaning                                                                  |
|------|--------------------------------------------------------------------------|
| 0    | success                                                                  |
| 1    | unexpected failure (a bug: please report it with COGRADCTL_DEBUG=1 output) |
| 2    | usage or input error: bad option, missing or invalid file, schema mismatch, out of GPU memory |
| 3    | a quality gate failed (measure-transference thresholds)                  |
| 4    | training diverged: a non-finite loss or gradient, or non-finite weights (never saved; the message names the step whose state last.safetensors keeps) |
| 5    | the environment refused: disk full, read-only or unwritable location, a path below a file |
| 130  | stopped by SIGINT (Ctrl-C) after saving the state: rerun the command to resume |
| 143  | stopped by SIGTERM after saving the state: rerun the command to resume   |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_INPUT = 2
EXIT_GATE = 3
EXIT_DIVERGED = 4
EXIT_ENVIRONMENT = 5


class CogradError(Exception):
    """Base of the errors cogradctl reports as one line; ``exit_code`` says how the CLI exits."""

    exit_code = EXIT_UNEXPECTED


class UsageError(CogradError):
    """A bad option value or combination of options."""

    exit_code = EXIT_INPUT


class DataError(CogradError):
    """A missing, unreadable or invalid data file, or data that does not fit the schema."""

    exit_code = EXIT_INPUT


class CheckpointError(CogradError):
    """A missing, unreadable or incompatible checkpoint."""

    exit_code = EXIT_INPUT


class PluginError(CogradError):
    """An unknown, duplicated or broken model plugin or gradient method."""

    exit_code = EXIT_INPUT


class GateFailed(CogradError):
    """A quality gate (threshold) failed."""

    exit_code = EXIT_GATE


class Diverged(CogradError):
    """A non-finite loss or gradient during training (with --on-nonfinite abort)."""

    exit_code = EXIT_DIVERGED


class EnvironmentFailure(CogradError):
    """The operating system refused an operation on a path (an ``OSError``): disk full, read-only
    file system, permission denied, a path below a regular file or under /proc. Not the command's
    input and not a bug: fix the location (or free space) and rerun; writes are atomic, so nothing
    half-written is left behind."""

    exit_code = EXIT_ENVIRONMENT

    @classmethod
    def from_os_error(cls, exc: OSError) -> EnvironmentFailure:
        """One line: the path(s) and the errno's meaning (``os.strerror``)."""
        import os

        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc) or type(exc).__name__)
        where = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
        text = f"{' → '.join(where)}: {reason}" if where else reason
        if exc.errno is None and str(exc) and str(exc) not in text:
            text = f"{text} ({str(exc)})" if where else str(exc)
        return cls(" ".join(text.split()))


class Stopped(CogradError):
    """Training stopped by a signal after saving its state; the exit code is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class OutOfMemory(CogradError):
    """The GPU ran out of memory (torch's ``OutOfMemoryError``): the model, the batch or the method's
    K×P gradient matrix does not fit. An input error (exit 2), not a bug: the remedy is a smaller
    ``--batch-size`` or model, or a larger GPU. Nothing is lost: the last saved state is intact."""

    exit_code = EXIT_INPUT

    @classmethod
    def from_torch(cls, exc: BaseException) -> OutOfMemory:
        """One line from torch's several sentences: how much was asked for, the device's capacity."""
        import re

        text = str(exc)
        asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
        where = re.search(r"GPU (\d+) has a total capacity of ([\d.]+ [KMGT]?i?B)", text)
        device = f"cuda:{where.group(1)} ({where.group(2)} in all)" if where else "the GPU"
        need = f" while allocating {asked.group(1)}" if asked else ""
        return cls(
            f"out of GPU memory on {device}{need}: use a smaller --batch-size or model config, or a GPU with more memory"
        )
