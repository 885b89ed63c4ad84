"""Every file cogradctl writes is written atomically: to a temporary file beside the target,
fsynced and renamed into place (then the folder fsynced), so a reader never sees a half-written
output and a failed or killed write leaves the target as it was. A killed writer's temporary file
is removed by the next write to the same path once that process is gone (``remove_stale_temps``).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + fsync + rename."""
    with staged_write(path, data):
        pass


def staged_write(path: Path, data: bytes) -> AbstractContextManager[Path]:
    """Write ``data`` to a temporary file beside ``path`` and yield that file's path; when the
    block ends normally it lands on ``path`` (``staged_file``), when it raises nothing does.
    Checks can so read the very bytes that will land before they do (``cogradctl import`` reloads
    its checkpoint through the plugin first)."""
    return staged(path, lambda f: f.write(data))


@contextmanager
def staged(path: Path, write: Callable[[BinaryIO], object]) -> Iterator[Path]:
    """``write(file)`` into a temporary file beside ``path``, naming ``path`` in an OSError; yield
    that file's path, which lands on ``path`` as ``staged_write``'s does (``checkpoint.staged_checkpoint``
    writes a checkpoint's tensors this way)."""
    with staged_file(path) as (f, tmp):
        try:
            write(f)
            f.flush()
        except OSError as exc:
            raise _naming(exc, path) from exc
        yield tmp


@contextmanager
def staged_file(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield ``(file, its path)``: a temporary file opened for writing beside ``path``. When the
    block ends normally the file is fsynced and renamed onto ``path`` (then the folder fsynced);
    when it raises, the file is removed and ``path`` is untouched (as are its folders: those this
    call created are removed again). Every output of cogradctl is written this way.

    The temporary file is ``.<name>.<host>-<pid>-<random>.tmp``: a writer killed mid-write leaves
    one behind, which the next write to the same path removes once that process is gone on this
    host (``remove_stale_temps``); another live writer's file is never touched. An ``OSError``
    while creating, syncing or renaming the file (disk full, read-only or unwritable folder, a path
    below a regular file) names ``path``; those raised inside the block are the caller's.
    """
    created = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    tmp = f = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path) + _owner_tag(), suffix=".tmp", dir=path.parent)
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
            f = os.fdopen(fd, "wb")
        except OSError as exc:
            raise _naming(exc, path) from exc
        yield f, Path(tmp)
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        except OSError as exc:
            raise _naming(exc, path) from exc
    except BaseException:
        if f is not None:
            f.close()
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise _naming(exc, path) from exc


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError of the same errno (and subclass) that names ``path``."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}-"


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writes to ``path`` whose writer died (same host, a
    process id that no longer exists); → the files removed. Files of live processes, of this
    process, of other hosts or in another naming are left alone."""
    prefix, host, removed = _temp_prefix(path), _host(), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        owner, pid, rand = (name[len(prefix) : -len(".tmp")].rsplit("-", 2) + ["", "", ""])[:3]
        if owner != host or not pid.isdigit() or not rand or int(pid) in (0, os.getpid()):
            continue
        if _alive(int(pid)):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an id the OS cannot check): leave its file
    return True
