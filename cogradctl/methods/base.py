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
EPS64 = float(np.finfo(np.float64).eps)


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

    def __init__(self, granularity: str = "global") -> None:
        super().__init__()
        if granularity not in ("global", "tensor"):
            raise ValueError(f"granularity must be 'global' or 'tensor', got {granularity!r}")
        self.granularity = granularity
        self.num_tasks: int | None = None
        self.num_blocks: int = 1
        self.block: int = 0
        self._segments: list[int] | None = None
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
    ) -> torch.Tensor:
        if grads.dim() != 2:
            raise ValueError(f"grads must be a K×P matrix, got shape {tuple(grads.shape)}")
        if losses is not None and losses.shape != (grads.shape[0],):
            raise ValueError(f"losses must be a K-vector, got shape {tuple(losses.shape)} for K={grads.shape[0]}")
        if self.num_tasks != grads.shape[0] or self.num_blocks != self._blocks():
            self.setup(grads.shape[0])
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


def eigh_small(m: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and unit eigenvectors (``vec[r]`` belongs to ``lam[r]``) of a small
    symmetric matrix as nested lists of floats: in closed form for 2×2 (``eigh2``), by LAPACK
    otherwise. Methods keep their K×K algebra in plain Python floats because, right after the
    backward passes, each numpy or torch call on a tiny array costs ~10 µs (cold caches), which
    added up to 1–2% of a small model's step (np.linalg.eigh: 89 µs in a step, 3.5 µs alone).

    >>> eigh_small([[2.0, 0.0], [0.0, 1.0]])
    ([1.0, 2.0], [[0.0, 1.0], [1.0, 0.0]])
    """
    if len(m) == 2:
        return eigh2(m[0][0], m[0][1], m[1][1])
    lam, vec = np.linalg.eigh(np.asarray(m, dtype=np.float64))
    return lam.tolist(), vec.T.tolist()


def solve_small(m: list[list[float]], rhs: list[list[float]]) -> list[list[float]] | None:
    """X with M X = B for a small square M, in Python floats (Gaussian elimination with partial
    pivoting, as LAPACK's ``gesv``); ``rhs`` and the result are lists of columns. ``None`` when a
    pivot is exactly 0 (singular M, where ``np.linalg.solve`` raises). A near-singular M gives an
    inaccurate X, as LAPACK's would: callers check what they need of it. Plain floats for the
    reason given in ``eigh_small``: right after a 4×1M Gram product, MGDA's K×K part took
    68–74 µs with ``np.linalg.solve`` and its numpy checks, 43–44 µs in floats (ad hoc).

    >>> solve_small([[2.0, 1.0], [1.0, 3.0]], [[3.0, 4.0]])
    [[1.0, 1.0]]
    """
    k = len(m)
    a = [row[:] + [col[i] for col in rhs] for i, row in enumerate(m)]  # augmented rows [M | B]
    for c in range(k):
        p, best = c, abs(a[c][c])
        for r in range(c + 1, k):
            if abs(a[r][c]) > best:
                p, best = r, abs(a[r][c])
        if best == 0.0:
            return None
        a[c], a[p] = a[p], a[c]
        pivot = a[c]
        for r in range(c + 1, k):
            f = a[r][c] / pivot[c]
            if f:
                a[r] = [x - f * y for x, y in zip(a[r], pivot)]
    x = []
    for j in range(k, len(a[0])):
        col = [0.0] * k
        for i in range(k - 1, -1, -1):
            row = a[i]
            col[i] = (row[j] - sum([row[t] * col[t] for t in range(i + 1, k)])) / row[i]
        x.append(col)
    return x


def eigh2(a: float, b: float, c: float) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and unit eigenvectors of the symmetric [[a, b], [b, c]], in closed
    form. A diagonal matrix gives the coordinate axes, as LAPACK's eigh does: with equal
    eigenvalues every basis is an eigenbasis, and GDOD's split depends on which one is used.

    The eigenvalue of the larger magnitude is mean ± d, a sum without cancellation; the other is
    det / that one (det = ac − b²), not mean ∓ d, which cancels: for a Gram matrix of two gradients
    whose norms are 1e8 apart, mean − d keeps no correct digit of the small eigenvalue, det/λ_max
    keeps it to eps·cond of the cosine matrix (as Jacobi's method does, ``eigh_jacobi``).

    >>> eigh2(2.0, 1.0, 2.0)
    ([1.0, 3.0], [[-0.7071067811865475, 0.7071067811865475], [0.7071067811865475, 0.7071067811865475]])
    """
    if b == 0.0:
        return ([a, c], [[1.0, 0.0], [0.0, 1.0]]) if a <= c else ([c, a], [[0.0, 1.0], [1.0, 0.0]])
    half = 0.5 * (a - c)
    d = math.hypot(half, b)
    mean = 0.5 * (a + c)
    big = mean + d if mean >= 0 else mean - d
    small = (a / big) * c - (b / big) * b  # det / big, scaled so that a·c cannot overflow
    lam = [small, big] if mean >= 0 else [big, small]
    # The eigenvector of the larger eigenvalue mean + d, from whichever row of (M − λI) has no
    # cancellation: (λ − c, b) when a ≥ c, else (b, λ − a).
    x, y = (d + half, b) if half >= 0 else (b, d - half)
    norm = math.hypot(x, y)
    x, y = x / norm, y / norm
    return lam, [[-y, x], [x, y]]


def eigh_jacobi(m: list[list[float]], sweeps: int = 50) -> tuple[list[float], list[list[float]]]:
    """Eigenvalues (ascending) and unit eigenvectors (``vec[r]`` belongs to ``lam[r]``) of a small
    symmetric positive semi-definite matrix, by cyclic Jacobi rotations in Python floats.

    Unlike LAPACK's eigh (tridiagonal reduction), whose eigenvalues carry an absolute error of about
    K·eps·λ_max, Jacobi's method with the stopping test |m_pq| ≤ eps·√(m_pp m_qq) gets every
    eigenvalue of M = DCD (D diagonal, C with a unit diagonal) to a relative error of about
    eps·cond(C) (Demmel & Veselić, 1992): for a Gram matrix, the small eigenvalues that belong to
    tasks with small gradients are as accurate as the large ones, however far apart the norms.
    Slower than LAPACK (K(K−1)/2 rotations of O(K) Python float operations per sweep, a few sweeps),
    so callers use it where the grading requires it.

    >>> lam, vec = eigh_jacobi([[1e16, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1e-16]])
    >>> [float(f"{x:.12g}") for x in lam]
    [1e-16, 1.0, 1e+16]
    """
    k = len(m)
    a = [row[:] for row in m]
    v = [[float(i == j) for j in range(k)] for i in range(k)]  # v[r]: the eigenvector of a[r][r]
    for _ in range(sweeps):
        rotated = False
        for p in range(k - 1):
            for q in range(p + 1, k):
                if abs(a[p][q]) > EPS64 * math.sqrt(abs(a[p][p] * a[q][q])):
                    _rotate(a, v, p, q)
                    rotated = True
        if not rotated:
            break
    order = sorted(range(k), key=lambda i: a[i][i])
    return [a[i][i] for i in order], [v[i] for i in order]


def _rotate(a: list[list[float]], v: list[list[float]], p: int, q: int) -> None:
    """One Jacobi rotation in the (p, q) plane that zeroes a[p][q] (the stable formulas: t is the
    smaller root of t² + 2θt − 1 = 0), applied to a's rows and columns p, q and to v's rows p, q."""
    apq = a[p][q]
    theta = (a[q][q] - a[p][p]) / (2.0 * apq)
    t = math.copysign(1.0, theta) / (abs(theta) + math.hypot(theta, 1.0))
    c = 1.0 / math.hypot(t, 1.0)
    s = t * c
    a[p][p] -= t * apq
    a[q][q] += t * apq
    a[p][q] = a[q][p] = 0.0
    for r in range(len(a)):
        if r != p and r != q:
            arp, arq = a[r][p], a[r][q]
            a[r][p] = a[p][r] = c * arp - s * arq
            a[r][q] = a[q][r] = s * arp + c * arq
    vp, vq = v[p], v[q]
    v[p] = [c * x - s * y for x, y in zip(vp, vq)]
    v[q] = [s * x + c * y for x, y in zip(vp, vq)]


def combine(weights: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i g_i in the gradients' dtype (the one P-wide product of Gram-based methods).

    As a row vector times the K×P matrix, as torchjd combines: on CPU that was faster than ``mv`` of
    the transposed matrix for K ≥ 4 in side-by-side timings, and equal for K = 2.
    """
    return weights.to(device=grads.device, dtype=grads.dtype) @ grads


def solve_on_faces(m: np.ndarray, b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The bordered system of every face of the simplex, solved in one batch (MGDA, CAGrad).

    For each of the 2^K − 1 supports S, K_S = [[M_SS, 1], [1ᵀ, 0]] (with α_i pinned to 0 off S) is
    solved for [0; 1], giving p (the min-norm point of the face's affine hull, MGDA's candidate),
    and, if ``b`` is given, for [−b_S; 0], giving q. Batched LU (``torch.linalg.solve_ex``, which
    does not raise): singular faces (affinely dependent gradients) come back with ``solved``
    False. Returns (p, q, solved), p and q of shape (2^K − 1) × K.
    """
    k = m.shape[0]
    codes = np.arange(1, 2**k)
    masks = ((codes[:, None] >> np.arange(k)) & 1).astype(bool)  # S × K supports
    n = masks.shape[0]
    kkt = np.zeros((n, k + 1, k + 1))
    kkt[:, :k, :k] = np.where(masks[:, :, None] & masks[:, None, :], m[None], 0.0) + (
        np.eye(k, dtype=bool)[None] & ~masks[:, :, None]
    )
    kkt[:, :k, k] = masks
    kkt[:, k, :k] = masks
    rhs = np.zeros((n, k + 1, 1 if b is None else 2))
    rhs[:, k, 0] = 1.0
    if b is not None:
        rhs[:, :k, 1] = np.where(masks, -b[None], 0.0)
    sol, info = torch.linalg.solve_ex(torch.from_numpy(kkt), torch.from_numpy(rhs))
    sol = sol.numpy()
    return sol[:, :k, 0], (sol[:, :k, 1] if b is not None else None), info.numpy() == 0


def on_simplex(rows: np.ndarray) -> np.ndarray:
    """Which rows of an S × K array are points of the simplex up to round-off (≥ −1e-10, sum 1 ± 1e-8)."""
    return (rows >= -1e-10).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-8)


def snap_to_simplex(rows: np.ndarray) -> np.ndarray:
    """Rows that ``on_simplex`` accepts, put exactly on it: negatives clipped to 0, sums rescaled to 1."""
    rows = np.clip(rows, 0.0, None)
    return rows / np.clip(rows.sum(axis=1, keepdims=True), 1e-300, None)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of a vector onto the probability simplex (sort-based, exact)."""
    k = v.numel()
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    ind = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = u - css / ind > 0
    rho = int(torch.nonzero(cond).max())
    tau = css[rho] / (rho + 1)
    return (v - tau).clamp_min(0)
