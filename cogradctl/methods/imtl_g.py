"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import math
import sys

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram
from cogradctl.methods.linalg import eigh_small, solve_small

EPS64 = sys.float_info.epsilon
# From 3 up to this many tasks a well-conditioned cosine matrix is solved directly (see _solve_direct).
SOLVE_MAX_TASKS = 4


class IMTLG(Method):
    """IMTL-G: the update in the span of the gradients with EQUAL projections on every unit g_i.

    With u_i = g_i/‖g_i‖ and the cosine matrix C_ij = u_iᵀu_j (the Gram matrix M Jacobi-scaled to a
    unit diagonal), d = Σ_i β_i u_i has projections u_iᵀd = (Cβ)_i, so β = C⁻¹1 makes them all
    equal; in terms of the gradients α_i = β_i/‖g_i‖ (that is M⁻¹n, n_i = ‖g_i‖: the paper's closed
    form), normalised so Σα = 1. Working with C rather than M keeps the accuracy and the rank
    decision independent of the gradients' norms: M's condition number carries the square of their
    spread, C's only the angles. Dependent gradients: β = C⁺1, the pseudo-inverse dropping
    eigenvalues of C below 10·K·eps·λ_max(C) (the least-squares fit of equal projections, each task
    counted equally). If Σα is not positive (possible for K ≥ 3 with very unequal norms)
    α = β/‖g‖ normalised by its L1 norm keeps the equal-projection direction (stats
    ``fallback_l1``); zero gradients get α_i = 0, all-zero gradients give a zero update. An
    unobserved task (``observed``) is left out like a zero gradient (α_i = 0): IMTL-G over the
    observed tasks.

    >>> import torch
    >>> IMTLG()(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))   # equal projections 0.75 on both
    tensor([0.7500, 0.7500])
    """

    family = "gradient manipulation"
    paper = "Towards Impartial Multi-task Learning (Liu et al., ICLR 2021)"
    options = {"granularity": GRANULARITY_OPTION}

    def __init__(self, granularity: str = "global") -> None:
        super().__init__(granularity)

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        m = gram(grads).tolist()  # the K×K algebra in Python floats (see eigh_small)
        tasks = range(len(m)) if self.observed_rows is None else self.observed_rows
        active = [i for i in tasks if m[i][i] > 0]
        norms = [math.sqrt(m[i][i]) for i in active]  # n_i = ‖g_i‖
        cos = [[m[i][j] / norms[a] / norms[b] for b, j in enumerate(active)] for a, i in enumerate(active)]
        beta = _solve_direct(cos)
        if beta is None:
            beta = _pinv_ones(cos)
        alpha = [0.0] * len(m)
        for a, i in enumerate(active):
            alpha[i] = beta[a] / norms[a]
        fallback = False
        if any(alpha):
            total = sum(alpha)
            l1 = sum(abs(a) for a in alpha)
            if total > 1e-12 * l1:
                alpha = [a / total for a in alpha]
            else:
                alpha, fallback = [a / l1 for a in alpha], True
        self.stats = {"weights": alpha, "fallback_l1": fallback}
        return combine(torch.tensor(alpha, dtype=torch.float64), grads)


def _solve_direct(c: list[list[float]]) -> list[float] | None:
    """C⁻¹1 for the unit-diagonal cosine matrix C when the pseudo-inverse would keep every
    eigenvalue, else ``None``.

    K = 1: 1. K = 2: C = [[1, c], [c, 1]] gives β = 1/(1 + c) for both (its other eigenvector,
    (1, −1), is orthogonal to 1), or ``None`` when 1 + c is below the cut (anti-parallel). K = 3, 4:
    one small elimination with 1 and the identity as right-hand sides (``solve_small``: right after
    a 4×1M Gram product, 39–40 µs against 64–74 µs for LAPACK's eigh, ad hoc); accepted when
    K·tr(C⁻¹) < 1e8, a bound on cond(C) (tr(C) = K) under which the smallest eigenvalue is far above
    the cut-off (10·K·eps·λ_max ≈ 1e-14·λ_max) and C⁻¹'s round-off (about cond·eps ≤ 2e-8
    relative) cannot turn the bound's verdict. Both tests are on C, so neither depends on the
    gradients' norms. K ≥ 5: ``None`` (LAPACK's eigh is faster than elimination in floats there).
    """
    k = len(c)
    if k <= 1:
        return [1.0] * k
    if k == 2:
        denom = 1.0 + c[0][1]
        return [1.0 / denom] * 2 if denom > 10 * k * EPS64 * (1.0 + abs(c[0][1])) else None
    if k > SOLVE_MAX_TASKS:
        return None
    cols = solve_small(c, [[1.0] * k] + [[float(i == j) for i in range(k)] for j in range(k)])
    if cols is None:
        return None
    inv_trace = sum(cols[1 + i][i] for i in range(k))
    if not 0 < k * inv_trace < 1e8:  # also rejects NaN
        return None
    return cols[0]


def _pinv_ones(c: list[list[float]]) -> list[float]:
    """C⁺1 = Σ_r v_r (v_rᵀ1) / λ_r over the eigenvalues above 10·K·eps·λ_max (all zero if λ_max ≤ 0)."""
    k = len(c)
    if k == 0:
        return []
    lam, vec = eigh_small(c)  # ascending
    lmax = lam[-1]
    beta = [0.0] * k
    if lmax <= 0:
        return beta
    for l, v in zip(lam, vec):
        if l > lmax * k * EPS64 * 10:
            f = sum(v) / l
            beta = [b + f * vi for b, vi in zip(beta, v)]
    return beta
