"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun, 2018)."""

from __future__ import annotations

import math

import numpy as np
import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, integer, number
from cogradctl.methods.linalg import on_simplex, project_simplex, snap_to_simplex, solve_on_faces, solve_small

# Up to this many tasks the min-norm problem is solved exactly by enumerating the simplex's faces.
EXACT_MAX_TASKS = 12


def _interior(mm: list[list[float]]) -> list[float] | None:
    """The min-norm point when it is interior to the simplex, else ``None`` (M scaled to max diagonal 1).

    When the minimiser over the whole affine hull has α ≥ 0 (the common case for nearly orthogonal
    gradients) it is the answer: Mα = λ·1 on the full support, so α ∝ M⁻¹1 when M is invertible.
    In Python floats (``solve_small``): this runs right after the Gram matrix has streamed the
    gradients through the caches, where every numpy call on a tiny array costs several µs.
    """
    k = len(mm)
    x = solve_small(mm, [[1.0] * k])
    if x is None:  # singular: linearly dependent gradients, the faces decide
        return None
    x = x[0]
    total = sum(x)
    if not (0 < total < math.inf) or min(x) < 0:  # also rejects NaN
        return None
    alpha = [v / total for v in x]
    # A near-singular M can give a feasible but inaccurate α: accept it only if it is stationary
    # (Mα = λ1 on the full support) to round-off.
    ma = [sum([r * a for r, a in zip(row, alpha)]) for row in mm]
    if max(ma) - min(ma) <= 1e-9 * max([max(map(abs, row)) for row in mm]):
        return alpha
    return None


def _faces_solve(mm: np.ndarray) -> np.ndarray:
    """Exact min of αᵀMα on the simplex (M float64, scaled to max diagonal 1): the KKT point of
    every face, batched; the best feasible."""
    # Singular faces (affinely dependent gradients) are skipped: the min-norm point also lies in
    # the hull of an affinely independent subset (Carathéodory), whose system is invertible.
    sol, _, solved = solve_on_faces(mm)
    feasible = solved & on_simplex(sol)
    sol = snap_to_simplex(sol)
    values = np.einsum("si,ij,sj->s", sol, mm, sol)
    values = np.where(feasible & np.isfinite(values), values, np.inf)
    return sol[int(np.argmin(values))].copy()


def _min_norm(a: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    """``min_norm_weights`` on a float64 numpy matrix. Up to 12 tasks the algebra is in Python
    floats and numpy (a torch op on a K×K matrix costs µs each)."""
    k = a.shape[0]
    rows = a.tolist()  # the K ≤ 12 cases in Python floats (see ``_interior``)
    scale = max((rows[i][i] for i in range(k)), default=0.0)
    if k == 1 or scale <= 0:
        return np.full(k, 1.0 / k), 0
    rows = [[v / scale for v in row] for row in rows]
    if k == 2:
        (a00, a01), (_, a11) = rows
        denom = a00 + a11 - 2 * a01
        if denom <= 1e-15:  # identical gradients: every point of the segment is the same vector
            g = 0.5
        else:
            g = min(max((a11 - a01) / denom, 0.0), 1.0)
        return np.array([g, 1.0 - g]), 0
    if k <= EXACT_MAX_TASKS:
        alpha = _interior(rows)
        return (np.array(alpha) if alpha is not None else _faces_solve(np.array(rows))), 0
    a = np.array(rows)
    m = torch.from_numpy(a)
    lipschitz = float(torch.linalg.eigvalsh(m)[-1])
    step = 1.0 / max(lipschitz, 1e-15)
    alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
    y, t = alpha.clone(), 1.0
    it = 0
    while it < max_iter:
        it += 1
        new = project_simplex(y - step * (m @ y))
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        if float(new @ (m @ new)) > float(alpha @ (m @ alpha)):  # objective went up: restart momentum
            y, t_new = new.clone(), 1.0
        else:
            y = new + ((t - 1) / t_new) * (new - alpha)
        alpha, t = new, t_new
        ma = m @ alpha
        if float(alpha @ ma - ma.min()) <= tol:
            break
    return alpha.numpy(), it


def min_norm_weights(m: torch.Tensor, max_iter: int = 2000, tol: float = 1e-12) -> tuple[torch.Tensor, int]:
    """Simplex weights α minimising αᵀ M α for a PSD K×K matrix M (float64); returns (α, iterations).

    K ≤ 2: closed form. K ≤ 12: exact, by solving the KKT system of every face of the simplex
    (2^K − 1 small systems, batched) and keeping the best feasible one. K > 12: accelerated
    projected gradient (FISTA with restart), stopped when the Frank-Wolfe duality gap
    αᵀMα − min_i (Mα)_i falls below ``tol`` × max_i M_ii or after ``max_iter`` iterations.
    """
    alpha, it = _min_norm(m.detach().cpu().to(torch.float64).numpy(), max_iter, tol)
    return torch.from_numpy(alpha), it


class MGDA(Method):
    """MGDA-UB: the update is the min-norm vector Σ_i α_i g_i over the simplex (Σα = 1, α ≥ 0).

    Solved on the K×K Gram matrix in float64 (closed form for K ≤ 2, exact face enumeration for
    K ≤ 12, accelerated projected gradient beyond). Option ``normalize='l2'``
    first scales every gradient to unit norm (the paper's normalisation option); the weights are
    then applied to the raw gradients divided by their norms. All-zero gradients give a zero update.
    An unobserved task (``observed``) is left out of the hull (weight 0): its zero row would
    otherwise be the min-norm point. An observed task with a zero gradient is Pareto-stationary,
    and the update is zero, as the definition says.

    >>> import torch
    >>> MGDA()(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    tensor([0.5000, 0.5000])
    """

    family = "gradient manipulation"
    paper = "Multi-Task Learning as Multi-Objective Optimization (Sener & Koltun, NeurIPS 2018)"
    options = {
        "normalize": "'none' (default) or 'l2': scale each task gradient to unit norm first",
        "max_iter": "iteration cap of the K>12 solver (default 2000)",
        "tol": "duality-gap tolerance of the K>12 solver, relative to the largest squared norm (default 1e-12)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(
        self, normalize: str = "none", max_iter: int = 2000, tol: float = 1e-12, granularity: str = "global"
    ) -> None:
        super().__init__(granularity)
        if normalize not in ("none", "l2"):
            raise ValueError(f"normalize must be 'none' or 'l2', got {normalize!r}")
        self.normalize = normalize
        self.max_iter = integer("max_iter", max_iter, 1)
        self.tol = number("tol", tol)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        m = self.observed_gram(grads).numpy()
        if self.normalize == "l2":
            norms = np.sqrt(np.maximum(m.diagonal(), 0.0))
            scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
            alpha, iters = _min_norm(m * scale[:, None] * scale[None, :], self.max_iter, self.tol)
            weights = alpha * scale
        else:
            alpha, iters = _min_norm(m, self.max_iter, self.tol)
            weights = alpha
        if self.observed_rows is not None:
            alpha, weights = self.spread(alpha).numpy(), self.spread(weights).numpy()
        self.stats = {"weights": alpha.tolist(), "iterations": float(iters)}
        return combine(torch.from_numpy(weights), grads)
