"""Fixed task weights (linear scalarisation with user weights)."""

from __future__ import annotations

import torch

from cogradctl.methods.base import Method, numbers, per_task


class Weighted(Method):
    """Weighted sum of the task gradients, ``Σ_i w_i g_i``, with fixed user weights (over the
    observed tasks: an unobserved task's term is left out).

    >>> import torch
    >>> Weighted(weights=[1.0, 0.5])(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    tensor([2., 2.])
    """

    family = "loss weighting"
    paper = "linear scalarisation (fixed weights)"
    options = {"weights": "task weights w_i: one value or one per task (default 1)"}

    def __init__(self, weights=1.0) -> None:
        super().__init__()
        self.weights_option = numbers("weights", weights)
        self.weights = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.weights = per_task(self.weights_option, num_tasks, "weights")

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        self.stats = {"weights": self.weights.tolist()}
        rows = self.observed_rows
        if rows is not None:
            return self.weights[rows].to(grads) @ grads[rows]
        return self.weights.to(grads) @ grads  # the weights are float64: cast to the gradients' dtype

    def task_weights(self) -> torch.Tensor | None:
        return self.weights
