"""The one abstraction of cogradctl's gradient methods.

A method maps the K×P matrix of task gradients on the shared parameters (one row per task) and
the K task losses to the P-vector update applied to the shared parameters. It is a
``torch.nn.Module`` so that any state it keeps across steps (moving averages, learnable loss
weights) lives in buffers and parameters that a checkpoint stores and restores with
``state_dict()``; learnable parameters (``method.parameters()``) are trained by the loop's
optimizer, and a method sets their ``.grad`` itself inside ``aggregate``.

What the training loop provides (the contract, read by the loop's author):

* ``method.segments``: ``list[int]``, the number of elements of each shared parameter tensor in
  the order in which they are flattened into a gradient row (``sum(segments) == P``). The loop
  sets it after construction, before or after ``setup`` but before ``load_state_dict`` (setting it
  re-allocates the state whose shape depends on it). It is needed only by methods constructed with
  ``granularity="tensor"``, which apply the method separately to each tensor's block of columns
  (as the per-layer variants of PCGrad and GradVac do); ``None`` means "one block".
* ``method.setup(K)``: called once before the first step (``forward`` calls it lazily too).
  Per-task state (buffers, parameters) is allocated there, so a checkpoint is restored with
  ``setup(K)`` then ``load_state_dict(...)``.
* ``requires_hvp``: when a method's instance attribute is true, the loop calls
  ``method(grads, losses, hvp=fn)`` where ``fn(i, v)`` returns ``H_i v``, the product of the
  Hessian of task ``i``'s loss with respect to the shared parameters (flattened like the rows of
  ``grads``) with the P-vector ``v`` (one double backward through task ``i``'s graph, so the loop
  keeps the graphs with ``create_graph=True``). Methods that do not need it ignore ``hvp``.
* ``observed``: ``method(grads, losses, observed=mask)`` with ``mask`` a K-vector of bools when
  some task had no labelled row in the batch (partial labels): such a task's row of ``grads`` is
  zero and its loss 0. ``forward`` sets ``self.observed`` (the K bool tensor, on the CPU; all True
  when the keyword is left out) and ``self.observed_rows`` (the observed tasks' indices, ``None``
  when every task is observed, so a method keeps its unchanged path with one ``is None`` test)
  before ``aggregate``, for every block with ``granularity="tensor"``. The rule every method
  follows: an unobserved task contributes nothing to the update (neither its row nor its loss
  affects it) and its per-task state (moving averages, loss history, learnable weights and their
  ``.grad``) is not moved by the step; when no task is observed, ``forward`` returns a zero update
  without calling ``aggregate``. ``observed_gram`` and ``spread`` are the Gram-based methods' helpers.
  A task that is observed but whose gradient is exactly zero is a different case: the method's own
  definition decides (MGDA: a stationary task, so a zero update).
* ``columns`` and ``column_state`` (row-sparse embedding tables, ``train --embeddings
  coordinate``): the matrix then holds the dense shared parameters' columns and only the rows of
  the tables that the batch touched; every other column is zero in every row and is left out, so
  the columns change from step to step (``segments`` is set each step). ``columns`` is the number
  of columns the matrix stands for (``None``: ``grads.shape[1]``): a method whose result depends on
  the number of zero columns (a mean over columns) divides by it. A method that keeps per-column
  state across steps sets ``column_state`` true and is refused in that mode.
* ``task_weights()``: the K weights the loop applies to each task's gradient on its own
  task-specific parameters (``None``: all 1).
* ``stats``: diagnostics of the last call (floats, bools or lists of floats), logged per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from cogradctl.errors import UsageError

HVP = Callable[[int, torch.Tensor], torch.Tensor]

GRANULARITY_OPTION = (
    "'global' (default: the method sees the whole flattened gradient) or 'tensor' (applied "
    "separately to each shared parameter tensor's block of columns)"
)

# Column block of the Gram matrix's partial products (see ``gram``).
_GRAM_CHUNK = 1 << 14
# Up to this many tasks ``gram`` builds the CPU Gram matrix column by column (see there).
_ROW_GRAM_MAX_TASKS = 4


class Method(torch.nn.Module):
    """Base class: subclasses implement ``aggregate`` and, if they keep per-task state, ``setup``.

    Class attributes describe the method for ``cogradctl methods``:
    ``family`` ("loss weighting", "gradient manipulation" or "transference"), ``paper`` and
    ``options`` (option name → one-line description). ``requires_hvp`` (false by default) asks the
    loop for Hessian-vector products (see the module docstring).

    Gradient-manipulation methods pass ``granularity`` to ``Method.__init__``; with ``"tensor"``
    the base class splits the columns by ``self.segments``, calls ``aggregate`` once per block with
    ``self.block`` set to the block's index (so state can be kept per block: ``self.num_blocks``
    is known in ``setup``), concatenates the updates and averages the blocks' numeric stats
    (``stats["blocks"]`` is the number of blocks).
    """

    family = ""
    paper = ""
    options: dict[str, str] = {}
    requires_hvp = False
    column_state = False  # keeps state per column across steps (see the module docstring)

    def __init__(self, granularity: str = "global") -> None:
        super().__init__()
        if granularity not in ("global", "tensor"):
            raise ValueError(f"granularity must be 'global' or 'tensor', got {granularity!r}")
        self.granularity = granularity
        self.num_tasks: int | None = None
        self.num_blocks: int = 1
        self.block: int = 0
        self._segments: list[int] | None = None
        self.columns: int | None = None  # the P the columns stand for, zero columns left out included
        # Which tasks the current step observed (see the module docstring): set by ``forward``.
        self.observed: torch.Tensor | None = None
        self.observed_rows: list[int] | None = None
        self._all_observed = 0  # K when self.observed is the all-True K-vector ``forward`` made
        # Diagnostics of the last call, logged to metrics.jsonl by the training loop.
        self.stats: dict[str, float | list[float]] = {}

    @property
    def segments(self) -> list[int] | None:
        """Sizes of the shared parameter tensors, in flattening order (set by the loop)."""
        return self._segments

    @segments.setter
    def segments(self, value: list[int] | None) -> None:
        self._segments = None if value is None else [int(v) for v in value]
        if self.num_tasks is not None:
            self._segments_changed()

    def _segments_changed(self) -> None:
        """Called when segments are set after ``setup``: re-allocate state whose shape depends on them.

        The default re-runs ``setup`` when the number of blocks changes (``granularity='tensor'``),
        so the loop may set ``segments`` before or after ``setup`` (but before loading state).
        """
        if self._blocks() != self.num_blocks:
            self.setup(self.num_tasks)

    def _blocks(self) -> int:
        if self.granularity == "tensor" and self.segments:
            return len(self.segments)
        return 1

    def setup(self, num_tasks: int) -> None:
        """Allocate per-task state for ``num_tasks`` tasks. Called once before the first step."""
        self.num_tasks = num_tasks
        self.num_blocks = self._blocks()

    def forward(
        self,
        grads: torch.Tensor,
        losses: torch.Tensor | None = None,
        hvp: HVP | None = None,
        observed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if grads.dim() != 2:
            raise ValueError(f"grads must be a K×P matrix, got shape {tuple(grads.shape)}")
        if losses is not None and losses.shape != (grads.shape[0],):
            raise ValueError(f"losses must be a K-vector, got shape {tuple(losses.shape)} for K={grads.shape[0]}")
        if self.num_tasks != grads.shape[0] or self.num_blocks != self._blocks():
            self.setup(grads.shape[0])
        self._set_observed(observed, grads.shape[0])
        if self.observed_rows == []:  # no task observed: nothing to do, no state moves
            self.stats = {}
            return grads.new_zeros(grads.shape[1])
        extra = {"hvp": hvp} if self.requires_hvp else {}
        if self.num_blocks == 1:
            self.block = 0
            return self.aggregate(grads, losses, **extra)
        if sum(self.segments) != grads.shape[1]:
            raise ValueError(f"segments sum to {sum(self.segments)} but grads have {grads.shape[1]} columns")
        updates, all_stats = [], []
        for b, block in enumerate(torch.split(grads, list(self.segments), dim=1)):
            self.block = b
            updates.append(self.aggregate(block, losses, **extra))
            all_stats.append(self.stats)
        self.block = 0
        self.stats = _mean_stats(all_stats)
        return torch.cat(updates)

    def _set_observed(self, observed, num_tasks: int) -> None:
        if observed is None:  # the common case: plain reads, no assignment (nn.Module's costs µs)
            if self.observed_rows is not None or self._all_observed != num_tasks:
                self.observed = torch.ones(num_tasks, dtype=torch.bool)
                self.observed_rows, self._all_observed = None, num_tasks
            return
        mask = torch.as_tensor(observed)
        if mask.dtype != torch.bool or mask.shape != (num_tasks,):
            raise ValueError(
                f"observed must be a K-vector of bools (K={num_tasks}), got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        self.observed, self._all_observed = mask.detach().cpu().clone(), 0
        rows = self.observed.nonzero().flatten().tolist()
        self.observed_rows = None if len(rows) == num_tasks else rows

    def observed_gram(self, grads: torch.Tensor) -> torch.Tensor:
        """``gram(grads)`` restricted to the observed tasks' rows and columns (K'×K', float64, CPU):
        a Gram-based method solves its problem on it as if the model had only those tasks."""
        m = gram(grads)
        rows = self.observed_rows
        return m if rows is None else m[rows][:, rows]

    def spread(self, values) -> torch.Tensor:
        """Per-task values of the observed tasks (a K'-sequence, as ``observed_gram``'s order) as a
        float64 K-vector with 0 for the unobserved tasks (the identity when every task is observed)."""
        values = torch.as_tensor(values, dtype=torch.float64).cpu()
        if self.observed_rows is None:
            return values
        out = torch.zeros(self.observed.numel(), dtype=torch.float64)
        out[self.observed_rows] = values
        return out

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def task_weights(self) -> torch.Tensor | None:
        """Weights of each task's gradient on its own task-specific parameters (None: all 1)."""
        return None


def _mean_stats(all_stats: list[dict]) -> dict:
    out: dict = {"blocks": float(len(all_stats))}
    for key in all_stats[0]:
        values = [s.get(key) for s in all_stats]
        try:
            out[key] = torch.tensor(values, dtype=torch.float64).mean(dim=0).tolist()
        except (TypeError, ValueError):
            out[key] = values[-1]
    return out


def number(name: str, value, minimum: float | None = 0.0, maximum: float | None = None, *, above: bool = False):
    """``value`` as a finite float in range, or a ValueError naming option ``name`` (which
    ``get_method`` turns into a usage error): not a number (``"abc"``, a list), NaN, ±inf, below
    ``minimum`` (or not above it, with ``above``) or beyond ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    x = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and (x <= minimum if above else x < minimum):
        raise ValueError(f"{name} must be {'>' if above else '≥'} {minimum:g}, got {value!r}")
    if maximum is not None and x > maximum:
        raise ValueError(f"{name} must be ≤ {maximum:g}, got {value!r}")
    return x


def integer(name: str, value, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    """``value`` as an int in [minimum, maximum] (a float only when whole), or a ValueError naming ``name``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value}")
    return value


def numbers(name: str, value, minimum: float | None = 0.0):
    """A one-or-per-task option (``gamma``, ``weights``): a number or a list of numbers, each
    checked by ``number``; → the value unchanged (``per_task`` makes the K-vector in ``setup``)."""
    items = value.tolist() if isinstance(value, torch.Tensor) else value
    if isinstance(items, (list, tuple)):
        if not items:
            raise ValueError(f"{name} must be a number or a list of numbers, got an empty list")
        for i, v in enumerate(items):
            number(f"{name}[{i}]", v, minimum)
    else:
        number(name, items, minimum)
    return value


def per_task(
    value: float | list[float] | tuple[float, ...] | torch.Tensor,
    num_tasks: int,
    name: str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A scalar or a K-sequence option as a K-vector; a wrong length names the option.

    Float64 by default: a method casts it to the gradients' dtype where it uses it, so float64
    gradients are weighted by the option's exact value (float32 storage rounded 0.1 by 1.5e-9).
    """
    t = torch.as_tensor(value, dtype=dtype).flatten()
    if t.numel() == 1:
        return t.expand(num_tasks).clone()
    if t.numel() != num_tasks:
        raise UsageError(f"option {name}: expected one value or {num_tasks} (one per task), got {t.numel()}")
    return t


def gram(grads: torch.Tensor) -> torch.Tensor:
    """The K×K Gram matrix G Gᵀ of the gradient rows, float64 (O(K²P) once).

    The columns are cut into blocks of ``_GRAM_CHUNK``; batched matmuls in the gradients' own
    dtype give every block's partial products, and the blocks are summed in float64. The dot
    products being short, that is accurate to float32 resolution of the inputs (measured: 2e-7
    relative to the largest entry for K = 2–8, P = 1M, against a float64 product; one float32
    matmul: 2e-5–7e-5) at no extra cost. Up to ``_ROW_GRAM_MAX_TASKS`` tasks on the CPU, column j
    is one batched row-times-matrix product (g_j's blocks against the blocks of rows 0..j): BLAS
    runs those as dot products along the columns, 20% faster at K = 2 and 6% at K = 4 than the
    K×K-tile product, which wastes most of its vector lanes on so small a tile (and than torchjd's
    single ``G @ Gᵀ``); from K = 8 the tile product is the faster (``benchmarks/speed.py`` section 2
    times both against torchjd). Returned on the CPU: the K×K solves that follow are tiny, and
    ``combine`` moves the resulting weights back to the gradients' device for the one P-wide
    product. Few torch ops: on a small model their fixed cost (µs each) is a visible part of the step.
    """
    k, p = grads.shape
    g = grads.detach()
    if g.dtype not in (torch.float32, torch.float64):
        g = g.float()
    blocks = p // _GRAM_CHUNK
    if blocks <= 1:
        m = (g @ g.T).cpu().numpy().astype(np.float64)
        return torch.from_numpy((m + m.T) / 2)  # the K×K tail in numpy: a torch op costs µs, numpy's a third
    head = g[:, : blocks * _GRAM_CHUNK].reshape(k, blocks, _GRAM_CHUNK).transpose(0, 1)  # blocks×K×chunk
    if k <= _ROW_GRAM_MAX_TASKS and g.device.type == "cpu":
        m = np.empty((k, k))
        for j in range(k):  # column j down to the diagonal: blocks × (1×chunk @ chunk×(j+1)), mirrored
            m[: j + 1, j] = m[j, : j + 1] = (
                torch.bmm(head[:, j : j + 1], head[:, : j + 1].transpose(1, 2)).numpy().sum(axis=0, dtype=np.float64)[0]
            )
    else:
        m = torch.bmm(head, head.transpose(1, 2)).cpu().numpy().sum(axis=0, dtype=np.float64)
        m = (m + m.T) / 2
    if p % _GRAM_CHUNK:
        tail = g[:, blocks * _GRAM_CHUNK :]
        t = (tail @ tail.T).cpu().numpy()
        m += (t + t.T) / 2
    return torch.from_numpy(m)


def combine(weights: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i g_i in the gradients' dtype (the one P-wide product of Gram-based methods).

    As a row vector times the K×P matrix, as torchjd combines: on CPU that was faster than ``mv`` of
    the transposed matrix for K ≥ 4 in side-by-side timings, and equal for K = 2.
    """
    return weights.to(device=grads.device, dtype=grads.dtype) @ grads
