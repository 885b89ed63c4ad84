"""The run's guards: the output directory's lock, and SIGTERM/SIGINT turned into a stop flag."""

from __future__ import annotations

import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from cogradctl.errors import UsageError


@contextmanager
def run_lock(out: Path):
    """Refuse an output directory that another live run holds; recover the lock of a dead one."""
    lock = out / ".lock"
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, host = _lock_owner(lock)
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                where = "" if host == socket.gethostname() else f" on {host}"
                raise UsageError(
                    f"--out {out}: in use by another cogradctl run (pid {pid}{where}); "
                    f"wait for it, or remove {lock} if that process is gone"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is dead
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    try:
        yield
    finally:
        try:
            if lock.read_text() == me:
                lock.unlink()
        except OSError:
            pass


def _lock_owner(lock: Path) -> tuple[int | None, str]:
    try:
        pid, _, host = lock.read_text().partition(" ")
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopFlag:
    """The signal that asked the run to stop, if any."""

    signum: int | None = None


@contextmanager
def stop_signals():
    """On SIGTERM or SIGINT, set a flag: the loop finishes its step, saves, and exits 128+signal."""
    flag = StopFlag()
    previous = {}

    def handler(signum, frame):
        flag.signum = signum

    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
