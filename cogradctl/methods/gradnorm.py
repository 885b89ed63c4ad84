"""GradNorm (Chen et al., ICML 2018)."""

from __future__ import annotations

import torch

from cogradctl.errors import UsageError
from cogradctl.methods.base import Method, number


class GradNorm(Method):
    """GradNorm: learnable task weights w_i that equalise the weighted gradient norms' training rates.

    At each step (variant: norms are taken over all the shared-parameter gradient rows the loop
    gives, not only the last shared layer as in the paper):

        n_i = ‖w_i g_i‖,   n̄ = mean_i n_i,   r_i = (L_i/L_i(0)) / mean_j (L_j/L_j(0))
        L_grad = Σ_i |n_i − n̄ r_i^α|          (n̄ r_i^α held constant)

    The method sets ``w.grad = ∂L_grad/∂w`` and the loop's optimizer steps it; before use, the
    weights are clamped positive and renormalised to sum to K. Update: Σ_i w_i g_i. The first losses
    seen are L(0) (a buffer); a non-positive L_i(0) gives r_i = 1.

    An unobserved task (``observed``) takes no part: the norms, means, ratios and ``L_grad`` are
    over the observed tasks, its ``w.grad`` is 0, and its weight is not renormalised (the observed
    weights are scaled to sum to K minus it, so the total stays K; only if that is not positive are
    all K renormalised). Its L_i(0) is its loss at the first step that observes it (−inf in the
    buffer until then).

    >>> import torch
    >>> m = GradNorm(alpha=1.5)
    >>> m(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([1.0, 1.0]))
    tensor([1., 3.])
    >>> m.weights.grad   # task 0 below the mean norm 2: raise w_0; task 1 above: lower w_1
    tensor([-1.,  3.])
    """

    family = "loss weighting"
    paper = "GradNorm: Gradient Normalization for Adaptive Loss Balancing (Chen et al., ICML 2018)"
    options = {"alpha": "asymmetry α: strength of the pull towards equal training rates (default 1.5)"}

    def __init__(self, alpha: float = 1.5) -> None:
        super().__init__()
        self.alpha = number("alpha", alpha)
        self.weights = None

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.weights = torch.nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        if losses is None:
            raise UsageError("method 'gradnorm' needs the task losses")
        k = grads.shape[0]
        rows = self.observed_rows
        if rows is not None:
            return self._aggregate_observed(grads, losses, rows)
        with torch.no_grad():
            w = self.weights.clamp_min(1e-6)
            self.weights.copy_(w * (k / w.sum()))
        w = self.weights.detach().to(torch.float64).cpu()
        loss = losses.detach().to(torch.float64).cpu()
        if not bool(self.started):
            self.initial_losses.copy_(loss)
            self.started.fill_(True)
        elif bool(torch.isneginf(self.initial_losses).any()):  # tasks unobserved so far: their L(0) now
            l0 = self.initial_losses.cpu()
            self.initial_losses.copy_(torch.where(torch.isneginf(l0), loss, l0))
        norms = grads.detach().to(torch.float64).norm(dim=1).cpu()
        n = w * norms
        l0 = self.initial_losses.cpu()
        ratio = torch.where(l0 > 0, loss / torch.where(l0 > 0, l0, 1.0), torch.ones_like(loss))
        mean_ratio = ratio.mean()
        rel = ratio / mean_ratio if mean_ratio > 0 else torch.ones_like(ratio)
        target = n.mean() * rel.clamp_min(0) ** self.alpha
        self.weights.grad = (torch.sign(n - target) * norms).to(self.weights)
        self.stats = {"weights": w.tolist(), "grad_norms": n.tolist(), "target_norms": target.tolist()}
        return w.to(grads) @ grads

    def _aggregate_observed(self, grads: torch.Tensor, losses: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``aggregate`` when some task is unobserved: GradNorm over the observed tasks ``rows``."""
        k = grads.shape[0]
        with torch.no_grad():
            w = self.weights.detach().clone()
            # K minus the unobserved tasks' weights (in float64: exactly K − 1 for one weight 1)
            budget = k - float(w[~self.observed.to(w.device)].double().sum())
            if budget > 0:
                sub = w[rows].clamp_min(1e-6)
                w[rows] = sub * (budget / sub.sum())
            else:  # only if the optimizer pushed the unobserved weights' sum to K: renormalise all
                w = w.clamp_min(1e-6)
                w = w * (k / w.sum())
            self.weights.copy_(w)
        w = self.weights.detach().to(torch.float64).cpu()
        loss = losses.detach().to(torch.float64).cpu()
        observed = self.observed
        l0 = self.initial_losses.cpu()
        if not bool(self.started):
            l0 = torch.full_like(l0, -torch.inf)
            self.started.fill_(True)
        l0 = torch.where(observed & torch.isneginf(l0), loss, l0)
        self.initial_losses.copy_(l0)
        norms = grads.detach().to(torch.float64).norm(dim=1).cpu()
        n = w * norms
        ratio = torch.where(l0 > 0, loss / torch.where(l0 > 0, l0, 1.0), torch.ones_like(loss))
        mean_ratio = ratio[rows].mean()
        rel = ratio / mean_ratio if mean_ratio > 0 else torch.ones_like(ratio)
        target = n[rows].mean() * rel.clamp_min(0) ** self.alpha
        grad = torch.where(observed, torch.sign(n - target) * norms, 0.0)
        self.weights.grad = grad.to(self.weights)
        target = torch.where(observed, target, 0.0)
        self.stats = {"weights": w.tolist(), "grad_norms": n.tolist(), "target_norms": target.tolist()}
        return w[rows].to(grads) @ grads[rows]

    def task_weights(self) -> torch.Tensor | None:
        return None if self.weights is None else self.weights.detach()
