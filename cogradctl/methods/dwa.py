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

    An unobserved task (``observed``) is left out of the update and its loss history is not moved:
    a period's mean loss of a task is over the steps that observed it, and a task no step of the
    period observed keeps its history (its weight still comes from it, so an observed task's weight
    does not depend on which others a batch labels). The per-task count of observed steps in the
    current period is not part of the saved state: a run resumed within a period counts that
    period's earlier steps as observed for every task.

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
        # Steps of the current period that observed each task (only read when some step did not).
        self._seen: list[int] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = None  # not saved: the restored period's earlier steps count as observed

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
        self.stats = {"weights": self.weights.tolist()}
        rows = self.observed_rows
        if rows is None and self._seen is None:
            self._record(losses)
            return self.weights.to(grads) @ grads
        self._record_observed(losses)
        if rows is None:
            return self.weights.to(grads) @ grads
        return self.weights[rows].to(grads) @ grads[rows]

    def _record(self, losses: torch.Tensor) -> None:
        """Record this step's losses (every task observed) for the next steps' weights."""
        self.accum += losses.detach().to(self.accum)
        self.counts[0] += 1
        if self.counts[0] % self.period == 0:
            self.history[0] = self.history[1]
            self.history[1] = self.accum / self.period
            self.accum.zero_()
            self.counts[1] += 1

    def _record_observed(self, losses: torch.Tensor) -> None:
        """``_record`` for the observed tasks only: each task's period mean is over its observed
        steps, and a task that no step of the period observed keeps its history."""
        k = self.observed.numel()
        if self._seen is None:
            self._seen = [int(self.counts[0]) % self.period] * k
        mask = self.observed.to(self.accum.device)
        self.accum += torch.where(mask, losses.detach().to(self.accum), 0.0)
        self._seen = [n + bool(o) for n, o in zip(self._seen, self.observed.tolist())]
        self.counts[0] += 1
        if self.counts[0] % self.period == 0:
            seen = torch.tensor(self._seen, dtype=self.accum.dtype, device=self.accum.device)
            moved = seen > 0
            self.history[0] = torch.where(moved, self.history[1], self.history[0])
            self.history[1] = torch.where(moved, self.accum / seen.clamp_min(1.0), self.history[1])
            self.accum.zero_()
            self.counts[1] += 1
            self._seen = None

    def task_weights(self) -> torch.Tensor | None:
        return None if self.num_tasks is None else self.weights.float()
