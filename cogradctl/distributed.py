"""Data-parallel runs under ``torchrun``: the process group, data shards and the per-step all-reduce.

``torchrun --nproc-per-node N -m cogradctl train …`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; :func:`process_group` joins them (NCCL on CUDA, each
process on GPU LOCAL_RANK; gloo on CPU). Without those variables (or WORLD_SIZE=1) nothing changes:
one process, no collective calls.

Every process keeps a full replica of the model and the method. Each step, process r computes its
per-task losses and gradients on its own rows (n_r of them) and :class:`StepReducer` sums
d_kr·(losses, K×P shared gradients, task-specific gradients) of each task k over the processes and
divides by Σ_r d_kr, d_kr the denominator of task k's loss on process r (n_r without partial labels
or weights, so this is the mean over the global batch's N = Σ n_r rows): every process then holds the losses and gradients of the global batch, bit-identical,
runs the same method on them and takes the same optimizer step, so the replicas never drift
apart. Row-sparse embedding tables (``--embeddings coordinate|sum``) are not all-reduced whole:
:meth:`StepReducer.rows` exchanges each process's touched rows (indices, then the rows scattered
onto their union and all-reduced). See docs/distributed.md for the communication volume.
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
    """Turns each process's (losses, K×P gradients, own gradients) of its rows into those of the
    global batch, with two all-reduces: the K×P matrix in place, and one small buffer with the
    losses, the task-specific gradients, the per-task denominators, the row count and the stop flag.

    Task k's loss on process p is a mean with denominator d_kp (``taskgrad.masked_losses``: the
    weights of its observed rows; n_p without masks or weights), so the global batch's is
    Σ_p d_kp L_kp / Σ_p d_kp, and likewise its gradients (shared, own, Hessian-vector products);
    a task no process observed keeps loss 0 and zero gradients."""

    def __init__(self, dist: Dist) -> None:
        self.dist = dist
        self.total = 0  # rows in the last global batch
        self.stop = False  # whether any process asked to stop (SIGTERM/SIGINT) at the last step
        self.denominators: torch.Tensor | None = None  # K: Σ_p d_kp of the last global batch
        self._mine: torch.Tensor | None = None  # K: this process's d_kp at the last call
        self.row_bytes = 0  # bytes this process handed to the last ``rows`` call's collectives

    def __call__(
        self,
        n: int,
        losses: torch.Tensor,
        g: torch.Tensor,
        own: dict[str, list[torch.Tensor]],
        stop: bool,
        d: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]] | None:
        """Reduce in place (``g``) and return (losses, own) of the global batch, or None if every
        process is out of data (the epoch is over). ``d``: this process's K denominators (None: n each)."""
        k = losses.numel()
        d = torch.full((k,), float(n), device=losses.device) if d is None else d.to(losses.device).float()
        if not n:
            d = torch.zeros_like(d)
        flat_own = [(i, t) for i, grads in enumerate(own.values()) for t in grads]
        small = torch.cat(
            [
                losses.reshape(-1).float() * d,
                *(t.reshape(-1).float() * d[i] for i, t in flat_own),
                d,
                torch.tensor([float(n), 1.0 if stop else 0.0], device=losses.device),
            ]
        )
        if n:
            g.mul_(d.to(g.dtype)[:, None])
        else:
            g.zero_()
        tdist.all_reduce(small)
        tdist.all_reduce(g)
        self.total, self.stop = int(round(small[-2].item())), bool(small[-1].item() > 0)
        if self.total == 0:
            return None
        self._mine, self.denominators = d, small[-2 - k : -2].clone()
        safe = _safe(self.denominators)
        g.div_(safe.to(g.dtype)[:, None])
        out_losses, at = (small[:k] / safe).to(losses.dtype), k
        out_own = {}
        for i, (task, grads) in enumerate(own.items()):
            out_own[task] = []
            for t in grads:
                out_own[task].append((small[at : at + t.numel()] / safe[i]).view_as(t).to(t.dtype))
                at += t.numel()
        return out_losses, out_own

    def hvp(
        self, n: int, fn: Callable[[int, torch.Tensor], torch.Tensor] | None, d: torch.Tensor | None = None
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Hessian-vector products of the global batch: Σ_p d_ip H_ip v / Σ_p d_ip (zero where a
        process has no rows; ``d``: this process's denominators, default those of the last reduce's
        call, n each without masks or weights)."""
        mine = self._mine if d is None else d

        def global_hvp(i: int, v: torch.Tensor) -> torch.Tensor:
            out = fn(i, v) * float(mine[i]) if n and fn is not None else torch.zeros_like(v)
            tdist.all_reduce(out)
            total = float(self.denominators[i])
            return out / total if total > 0 else torch.zeros_like(out)

        return global_hvp

    def rows(self, index: list[torch.Tensor], blocks: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Row-sparse tables (``tables.TableRows``), after ``__call__``: this process's touched rows of
        each table (``index[t]``, sorted) and their K × rows × dim task gradients (``blocks[t]``) →
        the global batch's: each table's union U_t of every process's touched rows (sorted, the same
        everywhere) and the K × Σ_t |U_t|·dim_t matrix, each task's rows Σ_p d_kp G_kp / Σ_p d_kp
        (as ``merge_rows`` computes in one process). Three collectives: the index sizes and the
        padded indices all-gathered, the rows scattered onto the unions and all-reduced."""
        device = blocks[0].device
        mine = torch.tensor([i.numel() for i in index], dtype=torch.long, device=device)
        sizes = [torch.empty_like(mine) for _ in range(self.dist.world)]
        tdist.all_gather(sizes, mine)
        flat = torch.zeros(max(1, *(int(s.sum()) for s in sizes)), dtype=torch.long, device=device)  # padded
        own = torch.cat(index).to(device)
        flat[: own.numel()] = own
        everyone = [torch.empty_like(flat) for _ in range(self.dist.world)]
        tdist.all_gather(everyone, flat)
        parts = [f[: int(s.sum())].split(s.tolist()) for f, s in zip(everyone, sizes)]
        unions = [union_rows([part[t] for part in parts]) for t in range(len(index))]
        out = placed(unions, index, blocks, self._mine)
        if out.numel():  # the same on every process (the unions are)
            tdist.all_reduce(out)
        self.row_bytes = sum(t.numel() * t.element_size() for t in (mine, flat, out))
        return unions, out.div_(_safe(self.denominators).to(out.dtype)[:, None])


def union_rows(indices: list[torch.Tensor]) -> torch.Tensor:
    """The sorted union of several processes' touched rows of one table."""
    return torch.unique(torch.cat(indices))


def placed(
    unions: list[torch.Tensor], index: list[torch.Tensor], blocks: list[torch.Tensor], d: torch.Tensor
) -> torch.Tensor:
    """One process's K × rows × dim blocks (table t's rows ``index[t]``, a subset of ``unions[t]``),
    each task's multiplied by its denominator d_k, placed at their rows' positions in the unions:
    K × Σ_t |U_t|·dim_t, each table's block row-major (``tables.TableRows.rows``'s layout)."""
    k = len(d)
    widths = [u.numel() * b.shape[2] for u, b in zip(unions, blocks)]
    out = torch.zeros(k, sum(widths), dtype=blocks[0].dtype, device=blocks[0].device)
    weights = d.to(out)[:, None, None]
    for union, rows, block, part in zip(unions, index, blocks, out.split(widths, 1)):
        target = part.view(k, union.numel(), block.shape[2])
        target.index_copy_(1, torch.searchsorted(union, rows.to(union.device)), block * weights)
    return out


def merge_rows(
    parts: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """In one process, what ``StepReducer.rows`` computes across processes: ``parts`` holds each
    process's (touched rows per table, K × rows × dim blocks per table, K denominators d_p) →
    (each table's union of touched rows, the K × Σ_t |U_t|·dim_t matrix Σ_p d_kp G_kp / Σ_p d_kp)."""
    tables = len(parts[0][0])
    unions = [union_rows([index[t] for index, _, _ in parts]) for t in range(tables)]
    total = sum(placed(unions, index, blocks, d) for index, blocks, d in parts)
    denominators = sum(d for _, _, d in parts)
    return unions, total.div_(_safe(denominators).to(total.dtype)[:, None])


def _safe(denominators: torch.Tensor) -> torch.Tensor:
    """Σ_p d_kp, with 1 where it is 0 (every process's share and sum are 0 there: a zero row stays zero)."""
    return torch.where(denominators > 0, denominators, torch.ones_like(denominators))
