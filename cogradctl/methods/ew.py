"""Equal weighting (linear scalarisation): the update is the sum (or mean) of the task gradients."""

from __future__ import annotations

import torch

from cogradctl.methods.base import Method


class EW(Method):
    """Equal weighting: sum (default) or mean of the task gradients.

    An unobserved task (``observed``) is left out of the sum; the mean still divides by K, the
    number of tasks, so an observed task's weight 1/K does not depend on which others a batch
    labels (the objective (1/K) Σ_i L_i simply lacks the absent term), as ``task_weights`` says.

    >>> import torch
    >>> EW()(torch.tensor([[1.0, -1.0], [3.0, 1.0]]))
    tensor([4., 0.])
    >>> EW(reduction="mean")(torch.tensor([[1.0, -1.0], [3.0, 1.0]]))
    tensor([2., 0.])
    """

    family = "loss weighting"
    paper = "linear scalarisation (equal weights)"
    options = {"reduction": "'sum' (default: every task weight 1) or 'mean' (weights 1/K)"}

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        rows = self.observed_rows
        update = grads.sum(dim=0) if rows is None else grads[rows].sum(dim=0)
        return update / grads.shape[0] if self.reduction == "mean" else update

    def task_weights(self) -> torch.Tensor | None:
        if self.reduction == "mean" and self.num_tasks:
            return torch.full((self.num_tasks,), 1.0 / self.num_tasks)
        return None
