"""IMTL-G: impartial multi-task learning, gradient part (Liu et al., ICLR 2021)."""

from __future__ import annotations

import numpy as np
import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram


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
        m = gram(grads).numpy()  # the K×K algebra in numpy: a torch op on a K×K matrix costs µs each
        k = m.shape[0]
        lam, vec = np.linalg.eigh(m)  # ascending
        lmax = float(lam[-1]) if k else 0.0
        fallback = False
        if lmax <= 0:
            alpha = np.zeros(k)
        else:
            keep = lam > lmax * k * np.finfo(np.float64).eps * 10
            kept = vec[:, keep]
            v = kept @ ((kept.T @ np.sqrt(np.maximum(m.diagonal(), 0.0))) / lam[keep])
            total = float(v.sum())
            l1 = float(np.abs(v).sum())
            if total > 1e-12 * l1:
                alpha = v / total
            else:
                alpha, fallback = v / l1, True
        self.stats = {"weights": alpha.tolist(), "fallback_l1": fallback}
        return combine(torch.from_numpy(alpha), grads)
