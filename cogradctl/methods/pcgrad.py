"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, integer


class PCGrad(Method):
    """PCGrad: each g_i is projected off the normal plane of every g_j it conflicts with.

    For each task i, in a random order of the other tasks j (``order='random'``, drawn from a
    seeded generator whose state is a buffer) or in index order (``order='fixed'``):
    if g_i^PC · g_j < 0 then g_i^PC ← g_i^PC − (g_i^PC·g_j / ‖g_j‖²) g_j (projection against the
    ORIGINAL g_j). Update: Σ_i g_i^PC (sum, as in the paper). Computed as coefficients on the Gram
    matrix: g_i^PC = Σ_k C_ik g_k. A zero g_j never triggers a projection. An unobserved task
    (``observed``) is left out: PCGrad over the observed tasks (the random order is drawn over them).

    >>> import torch
    >>> PCGrad()(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    tensor([0.5000, 1.5000])
    """

    family = "gradient manipulation"
    paper = "Gradient Surgery for Multi-Task Learning (Yu et al., NeurIPS 2020)"
    options = {
        "order": "'random' (default, as in the paper) or 'fixed' (tasks in index order)",
        "seed": "seed of the random order's generator (default 0)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(self, order: str = "random", seed: int = 0, granularity: str = "global") -> None:
        super().__init__(granularity)
        if order not in ("random", "fixed"):
            raise ValueError(f"order must be 'random' or 'fixed', got {order!r}")
        self.order = order
        self.seed = integer("seed", seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.register_buffer("rng_state", gen.get_state())

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        m = self.observed_gram(grads).tolist()  # the K×K loop in Python floats (see base.eigh_small on why)
        k = len(m)
        # With two tasks each has one other to project onto, so the order is moot: no draws (the
        # generator's state, a buffer the checkpoint keeps, then stays as it is).
        shuffle = self.order == "random" and k > 2
        if shuffle:
            gen = torch.Generator()
            gen.set_state(self.rng_state.cpu())
        coef = [[1.0 if a == b else 0.0 for b in range(k)] for a in range(k)]
        conflicts = 0
        for i in range(k):
            perm = torch.randperm(k, generator=gen).tolist() if shuffle else range(k)
            for j in perm:
                if j == i or m[j][j] <= 0:
                    continue
                dot = sum(c * x for c, x in zip(coef[i], m[j]))
                if dot < 0:
                    coef[i][j] -= dot / m[j][j]
                    conflicts += 1
        if shuffle:
            self.rng_state = gen.get_state()
        self.stats = {"projections": float(conflicts)}
        return combine(self.spread([sum(col) for col in zip(*coef)]), grads)
