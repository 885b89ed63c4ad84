"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

import torch

from cogradctl.errors import UsageError
from cogradctl.methods.base import Method, number


class UW(Method):
    """Uncertainty weighting: learnable log-variances s_i, objective Σ_i exp(−s_i) L_i + s_i.

    The shared update is Σ_i exp(−s_i) g_i; the method sets ``s.grad = 1 − exp(−s) ⊙ L`` (the
    gradient of the objective above) so that the loop's optimizer trains s. Needs the losses.
    An unobserved task (``observed``) is left out of the sum and gets ``s.grad`` 0.

    >>> import torch
    >>> m = UW()
    >>> m(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0.5, 3.0]))
    tensor([1., 2.])
    >>> m.log_vars.grad
    tensor([ 0.5000, -2.0000])
    """

    family = "loss weighting"
    paper = "Multi-Task Learning Using Uncertainty to Weigh Losses (Kendall et al., CVPR 2018)"
    options = {"init": "initial log-variance s_i (default 0, i.e. weight 1)"}

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.init = number("init", init, None)
        self.log_vars = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.log_vars = torch.nn.Parameter(torch.full((num_tasks,), self.init))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        if losses is None:
            raise UsageError("method 'uw' needs the task losses")
        s = self.log_vars.detach()
        # exp(−s) in float64, then the gradients' dtype: a float32 exp would round every weight by
        # up to 6e-8, which float64 gradients would then carry.
        w = torch.exp(-s.double())
        grad = 1.0 - w * losses.detach().double()
        self.stats = {"weights": w.tolist(), "log_vars": s.tolist()}
        rows = self.observed_rows
        if rows is not None:  # no term of the objective for an unobserved task: no gradient either
            self.log_vars.grad = torch.where(self.observed.to(grad.device), grad, 0.0).to(self.log_vars)
            return w[rows].to(grads) @ grads[rows]
        self.log_vars.grad = grad.to(self.log_vars)
        return w.to(grads) @ grads

    def task_weights(self) -> torch.Tensor | None:
        return None if self.log_vars is None else torch.exp(-self.log_vars.detach().double())
