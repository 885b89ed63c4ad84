"""Environment errors (issue #21 item 6): disk full, a read-only or unwritable location, a path
below a regular file or under /proc are exit 5 with the path and the errno's meaning on one line,
never exit 1; writes stay atomic (nothing half-written, no temporary file left)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from cogradctl import atomic_files
from cogradctl.errors import EXIT_ENVIRONMENT

TINY_TRAIN = ("--max-steps", "2", "--batch-size", "256", "--device", "cpu", "--quiet")


def assert_env_error(result, path, code):
    assert result.exit_code == EXIT_ENVIRONMENT, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in " ".join(lines[0].split()), result.stderr
    assert os.strerror(code) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr


def test_export_below_a_regular_file(cli, base_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "sub" / "model.pt"
    result = cli("export", base_checkpoint, "--out", target)
    assert_env_error(result, blocker, errno.ENOTDIR)


def test_train_out_below_a_regular_file(cli, base_checkpoint, sample_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"
    result = cli(
        "train", "--checkpoint", base_checkpoint, "--data", sample_dir / "train.parquet", "--out", out, *TINY_TRAIN
    )
    assert result.exit_code == EXIT_ENVIRONMENT, result.stderr
    assert str(blocker) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_export_under_proc(cli, base_checkpoint):
    result = cli("export", base_checkpoint, "--out", "/proc/cogradctl-test/model.pt")
    assert result.exit_code == EXIT_ENVIRONMENT, result.stderr
    assert "/proc/cogradctl-test" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_disk_full_names_the_path_and_leaves_nothing(cli, base_checkpoint, tmp_path, monkeypatch):
    """ENOSPC from the write itself (no file named by the OS) names the target."""
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "model.pt"
    result = cli("export", base_checkpoint, "--out", target)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert_env_error(result, target, errno.ENOSPC)
    assert list(tmp_path.iterdir()) == []  # no temporary file, no partial output


def test_read_only_location(cli, base_checkpoint, tmp_path, monkeypatch):
    """EROFS at the rename (a read-only file system) keeps the previous file intact."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src)

    monkeypatch.setattr(atomic_files.os, "replace", read_only)
    result = cli("export", base_checkpoint, "--out", target, "--overwrite")
    monkeypatch.undo()
    assert_env_error(result, target, errno.EROFS)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_permission_denied(cli, base_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = cli("export", base_checkpoint, "--out", locked / "model.pt")
    finally:
        locked.chmod(0o755)
    assert_env_error(result, locked / "model.pt", errno.EACCES)


def test_staged_write_errors_name_the_target(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_files.atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.bin")


# Issue #21 item 10: temporary files of killed writers are removed by the next write.


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "last.safetensors"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)  # a process that has exited
    tag = atomic_files._host()
    stale = tmp_path / f".last.safetensors.{tag}-{dead}-abcd1234.tmp"
    live = tmp_path / f".last.safetensors.{tag}-{os.getppid()}-abcd1234.tmp"  # a live process
    other_host = tmp_path / f".last.safetensors.elsewhere-{dead}-abcd1234.tmp"
    old_style = tmp_path / ".last.safetensors.k2j3h4g5.tmp"
    other_target = tmp_path / f".best.safetensors.{tag}-{dead}-abcd1234.tmp"
    for p in (stale, live, other_host, old_style, other_target):
        p.write_bytes(b"partial")
    atomic_files.atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert stale.name not in left
    assert {live.name, other_host.name, old_style.name, other_target.name} <= set(left)
    assert not [
        n for n in left if n.startswith(".last.safetensors.") and n not in {live.name, other_host.name, old_style.name}
    ]


def test_killed_writer_leftover_is_cleaned_by_the_next_save(tmp_path):
    """A writer SIGKILLed between writing its temporary file and the rename."""
    target = tmp_path / "x.safetensors"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from cogradctl import atomic_files as c\n"
        "with c.staged_write(Path(sys.argv[1]), b'half'):\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the kill left no temp file"
    atomic_files.atomic_write_bytes(target, b"full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
