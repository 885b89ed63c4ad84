"""Data-parallel runs under ``torchrun``: the process group, data shards and the per-step all-reduce.

``torchrun --nproc-per-node N -m cogradctl train …`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`process_group` joins them (NCCL on CUDA, each
process on GPU LOCAL_RANK; gloo on CPU). Without those variables (or WORLD_SIZE=1) nothing changes:
one process, no collective calls.

Every process keeps a full replica of the model and the method. Each step, process r computes its
per-task losses and gradients on its own rows (n_r of them) and :class:`StepReducer` sums
n_r·(losses, K×P shared gradients, task-specific gradients) over the processes and divides by
N = Σ n_r: every process then holds the losses and gradients of the global batch, bit-identical,
runs the same method on them and takes the same optimizer step, so the replicas never drift
apart. See docs/distributed.md for the communication volume per method family.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from cogradctl.errors import UsageError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def from_main(self, value: bool) -> bool:
        """Rank 0's ``value`` on every process."""
        if self.world == 1:
            return value
        t = torch.tensor([1.0 if value else 0.0], device=_device())
        tdist.broadcast(t, 0)
        return bool(t.item() > 0)

    def gather(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in rank order, on every process."""
        if self.world == 1:
            return items
        parts: list = [None] * self.world
        tdist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def shards(self, total: int) -> tuple[int, ...]:
        """The data shards this process reads when the data is cut into ``total`` shards."""
        per = total // self.world
        return tuple(range(self.rank * per, (self.rank + 1) * per))


SINGLE = Dist()


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


@contextmanager
def process_group(device: str):
    """Join torchrun's process group if there is one. Yields (Dist, device): on CUDA, each process
    takes GPU LOCAL_RANK (``--device cuda``; ``cuda:I`` is refused with several processes per node)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        yield SINGLE, device
        return
    if device.startswith("cuda"):
        if ":" in device and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise UsageError(
                f"--device {device}: under torchrun with several processes per node, use --device cuda "
                "(each process takes GPU LOCAL_RANK)"
            )
        device = device if ":" in device else f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    else:
        backend = "gloo"
    joined = not tdist.is_initialized()
    if joined:
        tdist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield Dist(rank, world), device
    finally:
        if joined:
            tdist.destroy_process_group()


class StepReducer:
    """Turns each process's (losses, K×P gradients, own gradients) of its n rows into those of the
    global batch, with two all-reduces: the K×P matrix in place, and one small buffer with the
    losses, the task-specific gradients, the row count and the stop flag."""

    def __init__(self, dist: Dist) -> None:
        self.dist = dist
        self.total = 0  # rows in the last global batch
        self.stop = False  # whether any process asked to stop (SIGTERM/SIGINT) at the last step

    def __call__(
        self, n: int, losses: torch.Tensor, g: torch.Tensor, own: dict[str, list[torch.Tensor]], stop: bool
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]] | None:
        """Reduce in place (``g``) and return (losses, own) of the global batch, or None if every
        process is out of data (the epoch is over)."""
        flat_own = [t for grads in own.values() for t in grads]
        small = torch.cat(
            [
                losses.reshape(-1).float() * n,
                *(t.reshape(-1).float() * n for t in flat_own),
                torch.tensor([float(n), 1.0 if stop else 0.0], device=losses.device),
            ]
        )
        if n:
            g.mul_(n)
        else:
            g.zero_()
        tdist.all_reduce(small)
        tdist.all_reduce(g)
        self.total, self.stop = int(round(small[-2].item())), bool(small[-1].item() > 0)
        if self.total == 0:
            return None
        small = small[:-2] / self.total
        g.div_(self.total)
        k = losses.numel()
        out_losses, at = small[:k].to(losses.dtype), k
        out_own = {}
        for task, grads in own.items():
            out_own[task] = []
            for t in grads:
                out_own[task].append(small[at : at + t.numel()].view_as(t).to(t.dtype))
                at += t.numel()
        return out_losses, out_own

    def hvp(
        self, n: int, fn: Callable[[int, torch.Tensor], torch.Tensor] | None
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Hessian-vector products of the global batch: Σ n_r H_r v / N (zero where a process has no rows)."""

        def global_hvp(i: int, v: torch.Tensor) -> torch.Tensor:
            out = fn(i, v) * n if n and fn is not None else torch.zeros_like(v)
            tdist.all_reduce(out)
            return out / self.total

        return global_hvp
