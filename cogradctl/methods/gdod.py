"""GDOD: gradient descent with orthogonal decomposition (docs/methods.md §3; our reading)."""

from __future__ import annotations

import math

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, eigh_small, gram, per_task


class GDOD(Method):
    """GDOD: keep the components of the gradients along task-shared orthogonal directions.

    M = G Gᵀ = V Λ Vᵀ; directions k with λ_k > eps·λ_max span the gradients, u_k = Gᵀv_k/σ_k
    (σ_k = √λ_k) is an orthonormal basis and c_ik = σ_k V_ik is task i's coordinate on it. A
    direction is task-shared when all c_ik have the same sign (coordinates with
    |c_ik| ≤ 1e-12·σ_max count as zero, which conflicts with neither sign), otherwise
    task-conflict. Update: Σ_{k shared} (Σ_i w_i c_ik) u_k + β Σ_{k conflict} (Σ_i w_i c_ik) u_k,
    computed as weights on G (no P-wide SVD). With β = 0 (default) and w ≥ 0 the update has a
    non-negative inner product with every g_i. No shared direction → zero update, reported in
    ``stats['no_shared_direction']``.

    >>> import torch
    >>> GDOD()(torch.tensor([[2.0, 1.0], [2.0, -1.0]]))   # the conflicting 2nd axis is dropped
    tensor([4., 0.])
    """

    family = "gradient manipulation"
    paper = "GDOD: Effective Gradient Descent using Orthogonal Decomposition for Multi-Task Learning (CIKM 2022)"
    options = {
        "weights": "task weights w_i ≥ 0: one value or one per task (default 1)",
        "eps": "relative eigenvalue threshold for the rank (default 1e-8)",
        "beta": "weight of the conflict directions' components (default 0: dropped)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(self, weights=1.0, eps: float = 1e-8, beta: float = 0.0, granularity: str = "global") -> None:
        super().__init__(granularity)
        if float(eps) < 0:
            raise ValueError("eps must be non-negative")
        if (torch.as_tensor(weights, dtype=torch.float64) < 0).any():
            raise ValueError("weights must be non-negative")
        self.weights_option = weights
        self.eps = float(eps)
        self.beta = float(beta)
        self.weights = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.weights = per_task(self.weights_option, num_tasks, "weights")

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        # After the Gram matrix, everything is K×K: plain Python floats (see eigh_small).
        m = gram(grads).tolist()
        k = len(m)
        lam, vec = eigh_small(m)  # vec[r]: the eigenvector of lam[r]
        lmax = max(lam)
        kept = [(l, v) for l, v in zip(lam, vec) if lmax > 0 and l > self.eps * lmax]
        w = self.weights.tolist()
        sigma_max = max((math.sqrt(l) for l, _ in kept), default=0.0)
        tiny = 1e-12 * sigma_max
        alpha, n_shared = [0.0] * k, 0
        for l, v in kept:
            sigma = math.sqrt(l)
            coords = [x * sigma for x in v]  # c_ik, task i's coordinate on u = Gᵀv/σ
            shared = not (any(c > tiny for c in coords) and any(c < -tiny for c in coords))
            n_shared += shared
            gain = 1.0 if shared else self.beta
            along = sum(wi * c for wi, c in zip(w, coords))  # Σ_i w_i c_ik
            # d = Σ_k gain_k along_k u_k = Σ_k (gain_k along_k / σ_k) v_kᵀ G: weights on the rows of G
            f = gain * along / sigma
            for i in range(k):
                alpha[i] += f * v[i]
        self.stats = {
            "rank": float(len(kept)),
            "shared_directions": float(n_shared),
            "conflict_directions": float(len(kept) - n_shared),
            "no_shared_direction": n_shared == 0,
        }
        return combine(torch.tensor(alpha, dtype=torch.float64), grads)

    def task_weights(self) -> torch.Tensor | None:
        return self.weights
