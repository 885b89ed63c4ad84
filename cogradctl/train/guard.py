"""The run's guards: the output directory's lock, and SIGTERM/SIGINT turned into a stop flag."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
from contextlib import contextmanager
from pathlib import Path

from cogradctl.errors import UsageError


@contextmanager
def run_dir(out: Path, main: bool = True):
    """The output directory, created if need be and locked, on rank 0 (other processes: nothing).
    Directories created here are removed again if the run fails before writing into them, so a
    refused run leaves nothing behind but what was there."""
    if not main:
        yield
        return
    created = [d for d in (out, *out.parents) if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(out):
            yield
    except BaseException:
        for d in created:  # innermost first; stops at the first one holding anything
            try:
                d.rmdir()
            except OSError:
                break
        raise


@contextmanager
def run_lock(out: Path):
    """Refuse an output directory that another live run holds; take over the lock of a dead one.

    The lock is an OS lock (``flock``) on ``out/.lock``, held while the run lives: the kernel
    releases it when the process ends, however it ends, so a dead run's lock is taken over whatever
    its PID has become since (reused, a zombie, garbage). The file records "pid host" for the
    message. A lock recorded by another host is refused even when it can be taken: flock need not
    reach across machines (NFS), so the process may be alive there.
    """
    lock = out / ".lock"
    me = f"{os.getpid()} {socket.gethostname()}"
    fd = _acquire(lock, out)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, me.encode())
        yield
    finally:
        try:
            if os.fstat(fd).st_ino == lock.stat().st_ino:
                lock.unlink()  # while still holding it: a waiting run then retries on a new file
        except OSError:
            pass
        os.close(fd)


def _acquire(lock: Path, out: Path) -> int:
    """An open descriptor of ``lock`` holding its exclusive flock."""
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = _lock_owner(fd)
            os.close(fd)
            _refuse(out, lock, pid, host)
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder may have unlinked the file between our open and flock: retry on the new one
            same = os.fstat(fd).st_ino == lock.stat().st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        pid, host = _lock_owner(fd)
        if pid is not None and host and host != socket.gethostname():
            os.close(fd)
            _refuse(out, lock, pid, host)
        return fd


def _refuse(out: Path, lock: Path, pid: int | None, host: str) -> None:
    where = "" if not host or host == socket.gethostname() else f" on {host}"
    who = f" (pid {pid}{where})" if pid is not None else ""
    raise UsageError(
        f"--out {out}: in use by another cogradctl run{who}; wait for it, or remove {lock} if that process is gone"
    )


def _lock_owner(fd: int) -> tuple[int | None, str]:
    """The "pid host" a lock file records (None, "" if it is empty or unreadable)."""
    try:
        pid, _, host = os.pread(fd, 4096, 0).decode().partition(" ")
        return int(pid), host.strip()
    except (OSError, ValueError, UnicodeDecodeError):
        return None, ""


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
