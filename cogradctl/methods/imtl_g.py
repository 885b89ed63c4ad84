"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import math
import sys

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, eigh_small, gram, solve_small

EPS64 = sys.float_info.epsilon
# From 3 up to this many tasks a well-conditioned Gram matrix is solved directly (see _solve_well_conditioned).
SOLVE_MAX_TASKS = 4


class IMTLG(Method):
    """IMTL-G: the update in the span of the gradients with EQUAL projections on every unit g_i.

    α ∝ M⁺ n with M the Gram matrix and n_i = ‖g_i‖, so (Σ α_j g_j)·g_i/‖g_i‖ is the same for
    every task; normalised so Σα = 1 (as the paper's closed form, which this generalises to
    rank-deficient M through the pseudo-inverse, as torchjd does). The pseudo-inverse drops
    eigenvalues below K·eps·λ_max. If Σ M⁺n is not positive (possible for K ≥ 3 with very
    unequal norms) α = M⁺n / ‖M⁺n‖₁ keeps the equal-projection direction (stats
    ``fallback_l1``); all-zero gradients give a zero update.

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
        norms = [math.sqrt(max(m[i][i], 0.0)) for i in range(len(m))]  # n_i = ‖g_i‖
        alpha = _solve_well_conditioned(m, norms)
        if alpha is None:
            alpha = _pinv_norms(m, norms)
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


def _solve_well_conditioned(m: list[list[float]], norms: list[float]) -> list[float] | None:
    """M⁻¹ n when M is so well conditioned that the pseudo-inverse keeps every eigenvalue, else
    ``None``. For 3 and 4 tasks, by one small elimination with n and the identity as right-hand
    sides (``solve_small``: right after a 4×1M Gram product, 39–40 µs against 64–74 µs
    for LAPACK's eigh, ad hoc).
    cond(M) ≤ tr(M)·tr(M⁻¹), and below 1e8 the smallest eigenvalue is far above the cut-off
    (K·eps·10·λ_max ≈ 1e-14·λ_max), while M⁻¹'s round-off (about cond·eps ≤ 2e-8 relative)
    cannot turn the bound's verdict."""
    k = len(m)
    if not 3 <= k <= SOLVE_MAX_TASKS:  # K = 2: eigh2's closed form is faster still
        return None
    cols = solve_small(m, [norms] + [[float(i == j) for i in range(k)] for j in range(k)])
    if cols is None:
        return None
    inv_trace = sum(cols[1 + i][i] for i in range(k))
    trace = sum(m[i][i] for i in range(k))
    if not (0 < inv_trace and 0 < trace and trace * inv_trace < 1e8):  # also rejects NaN
        return None
    return cols[0]


def _pinv_norms(m: list[list[float]], norms: list[float]) -> list[float]:
    """M⁺ n = Σ_r v_r (v_rᵀ n) / λ_r over the eigenvalues above K·eps·10·λ_max (all zero if λ_max ≤ 0)."""
    k = len(m)
    lam, vec = eigh_small(m)  # ascending
    lmax = lam[-1] if k else 0.0
    alpha = [0.0] * k
    if lmax <= 0:
        return alpha
    for l, v in zip(lam, vec):
        if l > lmax * k * EPS64 * 10:
            f = sum(vi * ni for vi, ni in zip(v, norms)) / l
            alpha = [a + f * vi for a, vi in zip(alpha, v)]
    return alpha
