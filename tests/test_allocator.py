"""cogradctl.allocator: glibc keeps freed memory, so training steps stop faulting their pages in again."""

import os
import platform
import subprocess
import sys

import pytest

from cogradctl import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Forward + backward of an MLP at batch 2048 (a few MB of activations per step); prints whether the
# settings were applied and the minor page faults per step after warm-up.
PROBE = """
import resource
from cogradctl.allocator import keep_freed_memory
applied = keep_freed_memory()
import torch
torch.manual_seed(0)
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1))
x = torch.randn(2048, 64)
def step():
    net(x).square().mean().backward()
for _ in range(20):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if k not in (*allocator.USER_SETTINGS, "COGRADCTL_MALLOPT")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout
    applied, faults = out.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_steps_reuse_their_pages():
    applied, faults = probe()
    assert applied
    # One 4 MiB activation faulted in afresh is 1024 faults (4 KiB pages); without the settings
    # this probe measured 1,200–6,000 per step, with them 0–102 (an occasional heap growth).
    assert faults < 300, f"{faults} page faults per step"


@pytest.mark.parametrize(
    "name, value",
    [
        ("COGRADCTL_MALLOPT", "0"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
    ],
)
def test_opt_out_and_user_settings_are_respected(monkeypatch, name, value):
    """These return before touching the allocator, so they are safe to run in the test process."""
    monkeypatch.setenv(name, value)
    assert allocator.keep_freed_memory() is False


def test_nothing_outside_linux(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
