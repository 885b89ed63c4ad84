"""Gradient Vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, integer, number


class GradVac(Method):
    """GradVac: raise each pair's cosine similarity up to an EMA target instead of only to zero.

    For each task i and each other task j (random order from a seeded generator, as PCGrad), with
    φ_ij = cos(g_i^GV, g_j) and target φ̂_ij (a buffer, initially 0): if φ_ij < φ̂_ij,

        g_i^GV ← g_i^GV + ‖g_i^GV‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²)) g_j

    then φ̂_ij ← (1−β) φ̂_ij + β φ_ij. Update: Σ_i g_i^GV. With ``granularity='tensor'`` each block
    keeps its own targets (the paper's per-layer variant). A pair with a zero gradient is skipped
    and its target left unchanged. An unobserved task (``observed``) is left out: GradVac over the
    observed tasks, and every target of a pair it belongs to is left unchanged.

    >>> import torch
    >>> GradVac()(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))   # first step: targets 0 = PCGrad
    tensor([0.5000, 1.5000])
    """

    family = "gradient manipulation"
    paper = "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively Multilingual Models (Wang et al., ICLR 2021)"
    options = {
        "beta": "EMA rate β of the cosine targets (default 0.5)",
        "eps": "added to denominators (default 1e-8)",
        "order": "'random' (default) or 'fixed' order of the other tasks",
        "seed": "seed of the random order's generator (default 0)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(
        self, beta: float = 0.5, eps: float = 1e-8, order: str = "random", seed: int = 0, granularity: str = "global"
    ) -> None:
        super().__init__(granularity)
        number("beta", beta, 0.0, 1.0)
        number("eps", eps)
        if order not in ("random", "fixed"):
            raise ValueError(f"order must be 'random' or 'fixed', got {order!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.order = order
        self.seed = integer("seed", seed)
        self.register_buffer("rng_state", torch.Generator().manual_seed(self.seed).get_state())

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.register_buffer("targets", torch.zeros(self.num_blocks, num_tasks, num_tasks, dtype=torch.float64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        m = self.observed_gram(grads).tolist()  # the K×K loop in Python floats (see base.eigh_small on why)
        k = len(m)
        rows = self.observed_rows
        everyone = self.targets[self.block]
        targets = (everyone if rows is None else everyone[rows][:, rows]).tolist()
        # With two tasks each has one other, so the order is moot: no draws (the generator's
        # state, a buffer the checkpoint keeps, then stays as it is).
        shuffle = self.order == "random" and k > 2
        if shuffle:
            gen = torch.Generator()
            gen.set_state(self.rng_state.cpu())
        coef = [[1.0 if a == b else 0.0 for b in range(k)] for a in range(k)]
        corrections = 0
        for i in range(k):
            row = coef[i]
            cm = [sum(row[a] * m[a][j] for a in range(k)) for j in range(k)]  # (g_i^GV · g_j)_j
            others = [j for j in range(k) if j != i]
            if shuffle:
                others = [others[p] for p in torch.randperm(len(others), generator=gen).tolist()]
            for j in others:
                norm_j = max(m[j][j], 0.0) ** 0.5
                norm_i = max(sum(c * r for c, r in zip(cm, row)), 0.0) ** 0.5
                if norm_j == 0.0 or norm_i == 0.0:
                    continue
                phi = cm[j] / (norm_i * norm_j + self.eps)
                phi_hat = targets[i][j]
                if phi < phi_hat:
                    s_phi = max(1.0 - phi * phi, 0.0) ** 0.5
                    s_hat = max(1.0 - phi_hat * phi_hat, 0.0) ** 0.5
                    w = norm_i * (phi_hat * s_phi - phi * s_hat) / (norm_j * s_hat + self.eps)
                    row[j] += w
                    cm = [c + w * x for c, x in zip(cm, m[j])]
                    corrections += 1
                targets[i][j] = (1.0 - self.beta) * phi_hat + self.beta * phi
        targets = torch.tensor(targets, dtype=torch.float64)
        if rows is None:
            self.targets[self.block] = targets
        else:
            index = torch.tensor(rows, device=self.targets.device)
            self.targets[self.block, index[:, None], index[None, :]] = targets.to(self.targets)
        if shuffle:
            self.rng_state = gen.get_state()
        self.stats = {"corrections": float(corrections)}
        return combine(self.spread([sum(col) for col in zip(*coef)]), grads)
