"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

import torch

from cogradctl.errors import UsageError
from cogradctl.methods.base import Method, integer, number


class DWA(Method):
    """Dynamic weight average: w_i = K softmax_i(r_i / T), r_i = L_i(t−1) / L_i(t−2).

    Variant: the paper averages losses over epochs; here ``period`` steps form one "epoch"
    (default 1: the ratio of the last two steps' losses). The first two periods use w = 1. A ratio
    whose denominator is not positive is taken as 1.

    >>> import torch
    >>> m = DWA()
    >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> m(g, torch.tensor([1.0, 1.0]))
    tensor([1., 1.])
    >>> _ = m(g, torch.tensor([1.0, 1.0]))
    >>> m(g, torch.tensor([1.0, 1.0]))   # equal ratios: equal weights
    tensor([1., 1.])
    """

    family = "loss weighting"
    paper = "End-to-End Multi-Task Learning with Attention (Liu et al., CVPR 2019)"
    options = {
        "temperature": "softmax temperature T (default 2.0)",
        "period": "steps averaged into one loss value (default 1)",
    }

    def __init__(self, temperature: float = 2.0, period: int = 1) -> None:
        super().__init__()
        self.temperature = number("temperature", temperature, above=True)
        self.period = integer("period", period, 1)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        # history[0]: mean loss of the period before last, history[1]: of the last period.
        self.register_buffer("history", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("accum", torch.zeros(num_tasks, dtype=torch.float64))
        # steps: total calls; periods: completed periods.
        self.register_buffer("counts", torch.zeros(2, dtype=torch.long))
        self.register_buffer("weights", torch.ones(num_tasks, dtype=torch.float64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        if losses is None:
            raise UsageError("method 'dwa' needs the task losses")
        k = grads.shape[0]
        if self.counts[1] >= 2:
            prev, last = self.history[0], self.history[1]
            ratio = torch.where(prev > 0, last / torch.where(prev > 0, prev, 1.0), torch.ones_like(last))
            ratio = torch.nan_to_num(ratio, nan=1.0, posinf=1.0, neginf=1.0)
            self.weights.copy_(k * torch.softmax(ratio / self.temperature, dim=0))
        else:
            self.weights.fill_(1.0)
        # Record this step's losses for the next steps' weights.
        self.accum += losses.detach().to(self.accum)
        self.counts[0] += 1
        if self.counts[0] % self.period == 0:
            self.history[0] = self.history[1]
            self.history[1] = self.accum / self.period
            self.accum.zero_()
            self.counts[1] += 1
        self.stats = {"weights": self.weights.tolist()}
        return self.weights.to(grads) @ grads

    def task_weights(self) -> torch.Tensor | None:
        return None if self.num_tasks is None else self.weights.float()
