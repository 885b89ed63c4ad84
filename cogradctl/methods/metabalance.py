"""MetaBalance (He et al., WWW 2022)."""

from __future__ import annotations

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, integer


class MetaBalance(Method):
    """MetaBalance: rescale auxiliary-task gradients towards the target task's gradient norm.

    Moving averages m_i ← β m_i + (1−β) ‖g_i‖ (buffers; starting from 0, so the bias cancels in the
    ratio). For every auxiliary task i ≠ t (t = ``main_task``), with the relax factor r:

        g_i ← (r · m_t / m_i + (1 − r)) g_i

    applied when ‖g_i‖'s average exceeds the target's (``strategy='reduce'``), is below it
    ('enlarge') or always ('adapt', default). Update: g_t + Σ_{i≠t} g_i (rescaled). An auxiliary
    task whose average norm is 0 is left unscaled.

    An unobserved task (``observed``) is left out of the update and its moving average is not
    moved. When the target task is the unobserved one, the observed auxiliary tasks are scaled
    towards its moving average as it stands (left unscaled if it is still 0: no target seen yet).

    >>> import torch
    >>> MetaBalance(relax=1.0)(torch.tensor([[1.0, 0.0], [0.0, 4.0]]))   # aux rescaled to norm 1
    tensor([1., 1.])
    """

    family = "gradient manipulation"
    paper = "MetaBalance: Improving Multi-Task Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks (He et al., WWW 2022)"
    options = {
        "main_task": "index of the target task (default 0)",
        "relax": "relax factor r in [0, 1] (default 0.7)",
        "beta": "moving-average factor β of the gradient norms (default 0.9)",
        "strategy": "'adapt' (default), 'reduce' or 'enlarge'",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(
        self,
        main_task: int = 0,
        relax: float = 0.7,
        beta: float = 0.9,
        strategy: str = "adapt",
        granularity: str = "global",
    ) -> None:
        super().__init__(granularity)
        if strategy not in ("adapt", "reduce", "enlarge"):
            raise ValueError(f"strategy must be 'adapt', 'reduce' or 'enlarge', got {strategy!r}")
        if not 0.0 <= float(relax) <= 1.0 or not 0.0 <= float(beta) < 1.0:
            raise ValueError("relax must be in [0, 1] and beta in [0, 1)")
        self.main_task = integer("main_task", main_task)
        self.relax = float(relax)
        self.beta = float(beta)
        self.strategy = strategy

    def setup(self, num_tasks: int) -> None:
        if not 0 <= self.main_task < num_tasks:
            raise ValueError(f"main_task {self.main_task} out of range for {num_tasks} tasks")
        super().setup(num_tasks)
        self.register_buffer("norm_avg", torch.zeros(self.num_blocks, num_tasks, dtype=torch.float64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        norms = grads.detach().to(torch.float64).norm(dim=1).cpu()
        avg = self.norm_avg[self.block]
        rows = self.observed_rows
        if rows is None:
            avg.mul_(self.beta).add_((1.0 - self.beta) * norms.to(avg))
        else:  # the unobserved tasks' averages stay as they are
            avg[rows] = self.beta * avg[rows] + (1.0 - self.beta) * norms[rows].to(avg)
        avg = avg.cpu()
        t = self.main_task
        ok = avg > 0
        if rows is not None and not bool(self.observed[t]) and not bool(ok[t]):
            ok = torch.zeros_like(ok)  # the target task not seen yet: nothing to scale towards
        ratio = torch.where(ok, avg[t] / torch.where(ok, avg, 1.0), torch.ones_like(avg))
        factor = self.relax * ratio + (1.0 - self.relax)
        if self.strategy == "reduce":
            factor = torch.where(avg > avg[t], factor, torch.ones_like(factor))
        elif self.strategy == "enlarge":
            factor = torch.where(avg < avg[t], factor, torch.ones_like(factor))
        factor = torch.where(ok, factor, torch.ones_like(factor))
        factor[t] = 1.0
        if rows is not None:
            factor = torch.where(self.observed, factor, 0.0)
            self.stats = {"scales": factor.tolist()}
            return factor[rows].to(grads) @ grads[rows]
        self.stats = {"scales": factor.tolist()}
        return factor.to(grads) @ grads
