"""Keep freed memory inside the process (glibc), so that every step reuses its pages.

PyTorch's CPU tensors come from ``malloc``. glibc hands large freed blocks back to the kernel
(``munmap``, or trimming the top of the heap), so each training step faults the pages of its
activations and gradients in again, a few thousand page faults per step on the built-in mmoe at
batch 2048. Where a page fault is expensive (virtual machines, containers) that is a large and very
noisy part of the step: ``python benchmarks/speed.py`` reports the floor with and without this
setting. ``keep_freed_memory`` sets glibc's ``M_MMAP_THRESHOLD`` to its largest value (32 MiB:
smaller blocks come from the heap), and ``M_TRIM_THRESHOLD`` (1 GiB) and ``M_TOP_PAD`` (64 MiB)
so that the heap is not shrunk and regrown every step: the usual advice for PyTorch on CPU, which
jemalloc or tcmalloc would also follow. The process keeps up to about 1 GiB of freed memory for
reuse instead of returning it to the system.

It changes nothing when the allocator is not glibc's (macOS, Windows, musl, or jemalloc/tcmalloc
preloaded, where glibc's settings are not used), when the user has set any of these thresholds
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``GLIBC_TUNABLES``),
or with ``COGRADCTL_MALLOPT=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Apply the settings above if this process allocates with glibc; → whether they were applied."""
    if os.environ.get("COGRADCTL_MALLOPT", "") == "0" or any(name in os.environ for name in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        _ = libc.gnu_get_libc_version  # glibc only (raises AttributeError elsewhere): musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
