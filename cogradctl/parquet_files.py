"""The Parquet files ``--data`` names, and reading them safely.

``--data`` is a file, a directory (every ``*.parquet`` below it) or a glob (matched directories,
e.g. hive partitions ``events/date=2026-11-*``, contribute every ``*.parquet`` below them). Every
entry that would be read must be a readable regular file (never skipped silently); CSV is refused
as CSV; a file whose column names repeat is refused. Errors name the file (DataError, exit 2).
"""

from __future__ import annotations

import glob as globlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogradctl.errors import DataError


def resolve(spec: str) -> list[Path]:
    """The Parquet files ``spec`` names, sorted; a clear error when there are none, or when an entry
    that would be read is a broken symbolic link or not a regular file (never skipped silently: the
    rest of the data would be trained on without it)."""
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        # a pattern may match directories too (hive partitions: 'events/date=2026-11-*'): their *.parquet
        files = set()
        for p in map(Path, globlib.glob(spec, recursive=True)):
            files.update(_below(p) if p.is_dir() else [_regular(p)])
        files = sorted(files)
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
        return _not_csv(files)
    if path.is_dir():
        files = _below(path)
        if not files:
            raise DataError(f"{spec}: directory has no *.parquet files{_csv_hint(path)}")
        return files
    if path.is_file():
        return _not_csv([path])
    if path.is_symlink():
        _regular(path)
    raise DataError(f"{spec}: no such file or directory")


def _csv_hint(root: Path) -> str:
    """For a directory of CSV files: that CSV is not read, and a command that converts one."""
    first = next(iter(sorted(root.rglob("*.csv"))), None)
    return "" if first is None else f" (it holds CSV files, e.g. {first}: {_convert(first)})"


def _not_csv(files: list[Path]) -> list[Path]:
    """A ``.csv`` file named directly or by a pattern is refused as CSV, not as unreadable Parquet."""
    first = next((f for f in files if f.suffix.lower() == ".csv"), None)
    if first is not None:
        raise DataError(f"{first}: a CSV file: {_convert(first)}")
    return files


def _convert(csv: Path) -> str:
    out = csv.with_suffix(".parquet")
    return (
        "CSV is not read; convert each to Parquet, e.g. python -c "
        f"\"import pyarrow.csv as c, pyarrow.parquet as p; p.write_table(c.read_csv('{csv}'), '{out}')\""
    )


def _below(root: Path) -> list[Path]:
    """Every ``*.parquet`` below ``root``, sorted (symbolic links to directories are not followed; a
    directory named ``*.parquet`` contributes its files); an unlistable directory is an error."""

    def fail(exc: OSError) -> None:
        raise DataError(f"{exc.filename}: cannot list this directory of the data ({os.strerror(exc.errno or 0)})")

    found = []
    for top, dirs, names in os.walk(root, onerror=fail):
        for name in names + dirs:
            p = Path(top, name)
            if name.endswith(".parquet") and not p.is_dir():
                found.append(_regular(p))
    return sorted(found)


def _regular(p: Path) -> Path:
    """``p`` if it is a regular file (or a link to one); else a DataError saying what it is."""
    if p.is_file():
        return p
    if p.is_symlink():
        raise DataError(
            f"{p}: a broken symbolic link (to {os.readlink(p)}, which does not exist); fix or remove it, "
            "the data would be read without it"
        )
    raise DataError(f"{p}: not a regular file; a Parquet file was expected")


def read_schema(path: Path) -> pa.Schema:
    try:
        arrow = pq.read_schema(path)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # a damaged column name is not UTF-8
        raise DataError(f"{path}: not a readable Parquet file ({_short(exc)})") from exc
    check_names(path, arrow)
    return arrow


def check_names(path: Path | str, arrow: pa.Schema) -> None:
    """A file whose columns repeat a name is refused, whichever columns are read: which of the
    two a name means is ambiguous (Arrow cannot select it), so this is always the writer's mistake."""
    seen: set[str] = set()
    for name in arrow.names:
        if name in seen:
            raise DataError(
                f"{path}: column '{name}' appears {arrow.names.count(name)} times; "
                "column names must be unique (rename or drop the duplicate)"
            )
        seen.add(name)


def read_file(path: Path, columns: list[str]) -> pa.Table:
    """Read ``columns`` of one file; a missing column or a corrupt file is a DataError naming it."""
    names = read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (the checkpoint's schema needs them)")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({_short(exc)})") from exc


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
