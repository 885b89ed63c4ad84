"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import numpy as np
import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, numbers, per_task


class AlignedMTL(Method):
    """Aligned-MTL: make the gradient system's condition number 1 before the weighted sum.

    With M = G Gᵀ = V Λ Vᵀ (rank r: eigenvalues above λ_max·K·eps of the gradients' dtype), the
    balance transform B = √λ_s V_r Λ_r^{-1/2} V_rᵀ turns G into aligned, orthogonal components of
    equal norm √λ_s (λ_s: the smallest kept eigenvalue by default, ``scale='min'``; 'median' or
    'mean' as variants); the update is (B w)ᵀ G with the task preferences w (``weights``, default
    1 per task: the sum convention of ``ew``). All-zero gradients give a zero update. An
    unobserved task (``observed``) is left out: the transform is built from the observed tasks'
    Gram matrix and preferences, and the unobserved task gets weight 0.

    >>> import torch
    >>> AlignedMTL()(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))   # both components rescaled to norm 1
    tensor([1., 1.])
    """

    family = "gradient manipulation"
    paper = "Independent Component Alignment for Multi-Task Learning (Senushkin et al., CVPR 2023)"
    options = {
        "weights": "task preference weights w: one value or one per task (default 1)",
        "scale": "eigenvalue that sets the aligned norm: 'min' (default), 'median' or 'mean'",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(self, weights=1.0, scale: str = "min", granularity: str = "global") -> None:
        super().__init__(granularity)
        if scale not in ("min", "median", "mean"):
            raise ValueError(f"scale must be 'min', 'median' or 'mean', got {scale!r}")
        self.weights_option = numbers("weights", weights)
        self.scale = scale
        self.weights = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.weights = per_task(self.weights_option, num_tasks, "weights")

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        m = self.observed_gram(grads).numpy()  # the K×K algebra in numpy: a torch op on a K×K matrix costs µs each
        k = m.shape[0]
        lam, vec = np.linalg.eigh(m)
        tol = float(lam.max()) * k * torch.finfo(grads.dtype).eps
        keep = lam > tol
        rank = int(keep.sum())
        w = self.weights.detach().cpu().double().numpy()
        if self.observed_rows is not None:
            w = w[self.observed_rows]
        if rank == 0:
            alpha = np.zeros(k)
        else:
            lam_r, vec_r = lam[keep], vec[:, keep]
            if self.scale == "min":
                s = lam_r.min()
            elif self.scale == "median":
                s = np.sort(lam_r)[(rank - 1) // 2]
            else:
                s = lam_r.mean()
            balance = np.sqrt(s) * (vec_r / np.sqrt(lam_r)) @ vec_r.T
            alpha = balance @ w
        alpha = self.spread(alpha)
        self.stats = {"weights": alpha.tolist(), "rank": float(rank)}
        return combine(alpha, grads)

    def task_weights(self) -> torch.Tensor | None:
        return self.weights
