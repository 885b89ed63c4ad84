"""Helpers for tests that run `cogradctl train` in a subprocess and interrupt it: the command line
under torchrun, the step its `last.safetensors` holds, its weights, and waiting for a step before a
signal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from cogradctl import checkpoint as ckpt_io


def torchrun(nproc: int, *args) -> list[str]:
    """``cogradctl ARGS`` under torchrun with ``nproc`` processes on this machine (gloo on CPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "cogradctl",
        *map(str, args),
    ]


def saved_step(out: Path) -> int:
    """The step of the run directory's last.safetensors; -1 while there is none (or it is mid-write)."""
    try:
        return ckpt_io.load(out / "last.safetensors").training_state["step"]
    except Exception:
        return -1


def weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt_io.load(out / "last.safetensors").state


def wait_for_step(proc, out: Path, step: int, timeout: float = 120.0) -> None:
    """Wait until ``out`` holds step ``step`` or later; fail if ``proc`` ends or stalls first."""
    deadline = time.time() + timeout
    while saved_step(out) < step:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)
