"""GDOD: gradient descent with orthogonal decomposition (docs/methods.md §3; our reading)."""

from __future__ import annotations

import math

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram, number, numbers, per_task
from cogradctl.methods.linalg import eigh_jacobi, eigh_small


class GDOD(Method):
    """GDOD: keep the components of the gradients along task-shared orthogonal directions.

    M = G Gᵀ = V Λ Vᵀ; u_k = Gᵀv_k/σ_k (σ_k = √λ_k) is an orthonormal basis of the span of the
    gradients and c_ik = σ_k V_ik is task i's coordinate on it. A direction is kept unless the
    gradients it combines cancel to working precision: λ_k ≤ eps · Σ_i V_ik² ‖g_i‖², its
    eigenvalue against what it would be were those gradients orthogonal (a Rayleigh quotient of
    the cosine matrix, so independent of the norms; a cut relative to λ_max could not tell a
    dependent direction from a task with a small gradient). A kept direction is task-shared when
    all c_ik have the same sign (a coordinate with |c_ik| ≤ 1e-12·‖g_i‖ counts as zero, which
    conflicts with neither sign), otherwise task-conflict. Update:
    Σ_{k shared} (Σ_i w_i c_ik) u_k + β Σ_{k conflict} (Σ_i w_i c_ik) u_k = Σ_k gain_k (wᵀv_k) Gᵀv_k,
    weights on G (no P-wide SVD, and no division by σ_k). With β = 0 (default) and w ≥ 0 the update
    has a non-negative inner product with every g_i. No shared direction → zero update, reported
    in ``stats['no_shared_direction']``. Zero gradients take no part (weight 0), nor do unobserved
    tasks (``observed``): GDOD over the observed tasks.

    >>> import torch
    >>> GDOD()(torch.tensor([[2.0, 1.0], [2.0, -1.0]]))   # the conflicting 2nd axis is dropped
    tensor([4., 0.])
    """

    family = "gradient manipulation"
    paper = "GDOD: Effective Gradient Descent using Orthogonal Decomposition for Multi-Task Learning (CIKM 2022)"
    options = {
        "weights": "task weights w_i ≥ 0: one value or one per task (default 1)",
        "eps": (
            "a direction is dropped when its eigenvalue is at most eps times what it would be for orthogonal "
            "gradients of the same norms (default 1e-8)"
        ),
        "beta": "weight of the conflict directions' components (default 0: dropped)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(self, weights=1.0, eps: float = 1e-8, beta: float = 0.0, granularity: str = "global") -> None:
        super().__init__(granularity)
        self.weights_option = numbers("weights", weights)
        self.eps = number("eps", eps)
        self.beta = number("beta", beta)
        self.weights = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.weights = per_task(self.weights_option, num_tasks, "weights")

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        # After the Gram matrix, everything is K×K: plain Python floats (see eigh_small).
        full = gram(grads).tolist()
        tasks = range(len(full)) if self.observed_rows is None else self.observed_rows
        active = [i for i in tasks if full[i][i] > 0]
        m = full if len(active) == len(full) else [[full[i][j] for j in active] for i in active]
        norms = [math.sqrt(m[a][a]) for a in range(len(m))]  # ‖g_i‖
        w_all = self.weights.tolist()
        w = [w_all[i] for i in active]
        beta, n_kept, n_shared = [0.0] * len(m), 0, 0
        top = self.eps * max(norms, default=0.0) ** 2  # ≥ eps·Σ_i V_ik²‖g_i‖²: above it, no sum needed
        for lam, v in zip(*eigh_graded(m)):
            if not (lam > top or lam > self.eps * sum((x * n) ** 2 for x, n in zip(v, norms))):
                continue  # the gradients cancel along this direction: dependent to working precision
            n_kept += 1
            shared = _shared(lam, v, norms)
            n_shared += shared
            # gain · (Σ_i w_i c_ik) u_k = gain · (wᵀv_k) · Gᵀv_k: weights on the rows of G
            f = (1.0 if shared else self.beta) * sum(wi * x for wi, x in zip(w, v))
            beta = [b + f * x for b, x in zip(beta, v)]
        alpha = [0.0] * len(full)
        for a, i in enumerate(active):
            alpha[i] = beta[a]
        self.stats = {
            "weights": alpha,  # d = Σ_i alpha_i g_i
            "rank": float(n_kept),
            "shared_directions": float(n_shared),
            "conflict_directions": float(n_kept - n_shared),
            "no_shared_direction": n_shared == 0,
        }
        return combine(torch.tensor(alpha, dtype=torch.float64), grads)

    def task_weights(self) -> torch.Tensor | None:
        return self.weights


def _shared(lam: float, v: list[float], norms: list[float]) -> bool:
    """Whether no two tasks' coordinates c_ik = σ_k V_ik on the direction have opposite signs, a
    coordinate with |c_ik| ≤ 1e-12·‖g_i‖ counting as zero (it conflicts with neither sign)."""
    sigma = math.sqrt(lam)
    rel = [sigma * x / n for x, n in zip(v, norms)]  # c_ik / ‖g_i‖
    return not (max(rel) > 1e-12 and min(rel) < -1e-12)


def eigh_graded(m: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """The eigen-decomposition GDOD needs: every eigenvalue of the Gram matrix to a relative accuracy
    that does not depend on the spread of the gradients' norms. K ≤ 2: ``eigh2``'s closed form has
    it. K ≥ 3: LAPACK (``eigh_small``) while the norms are within a factor 100 of each other — its
    absolute error K·eps·λ_max is then at most about 1e4·K·eps·min‖g_i‖², so every direction's test
    against eps·Σ_i V_ik²‖g_i‖² (≥ eps·min‖g_i‖²) is decided to 1e-11 — and Jacobi's method
    (``eigh_jacobi``, slower) beyond."""
    sq = [m[i][i] for i in range(len(m))]
    if not m:
        return [], []
    if len(m) <= 2 or min(sq) >= 1e-4 * max(sq):
        return eigh_small(m)
    return eigh_jacobi(m)
