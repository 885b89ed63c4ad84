"""allocator.huge_pages: PyTorch's large CPU allocations on transparent huge pages (large embedding
tables and their Adam moments, read and written at scattered rows), with the user's opt-outs."""

import subprocess
import sys
from pathlib import Path

import pytest

from cogradctl import allocator

LINUX = sys.platform.startswith("linux")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A 256 MiB tensor, allocated after huge_pages() (or not): prints whether it was set and the
# process's AnonHugePages (kB, /proc/self/smaps).
PROBE = """
import sys
from cogradctl.allocator import huge_pages
applied = huge_pages() if sys.argv[1] == "1" else False
import torch
x = torch.ones(64 << 20)
huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages:"))
print(applied, huge)
"""


@pytest.fixture
def clean_env(monkeypatch):
    for name in (allocator.THP_VARIABLE, "COGRADCTL_MALLOPT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.skipif(not LINUX, reason="Linux only")
def test_huge_pages_sets_pytorchs_variable(clean_env):
    import os

    assert allocator.huge_pages() is True
    assert os.environ[allocator.THP_VARIABLE] == "1"


@pytest.mark.parametrize("env", [{"COGRADCTL_MALLOPT": "0"}, {"THP_MEM_ALLOC_ENABLE": "0"}])
def test_huge_pages_leaves_the_users_choice(clean_env, env):
    import os

    for name, value in env.items():
        clean_env.setenv(name, value)
    assert allocator.huge_pages() is False
    assert os.environ.get(allocator.THP_VARIABLE) == env.get(allocator.THP_VARIABLE)


@pytest.mark.skipif(
    not LINUX or not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages unavailable"
)
def test_a_large_tensor_lands_on_huge_pages_only_when_asked():
    def probe(flag: str) -> tuple[str, int]:
        env = {k: v for k, v in __import__("os").environ.items() if k not in (allocator.THP_VARIABLE,)}
        env.pop("COGRADCTL_MALLOPT", None)
        out = subprocess.run(
            [sys.executable, "-c", PROBE, flag], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    applied, huge = probe("1")
    assert applied == "True" and huge > 0
    if "[madvise]" in THP.read_text():  # without the request, madvise mode gives none
        assert probe("0") == ("False", 0)
