"""CoGrad: gradient coordination that maximises inter-task transference (SIGIR 2023).

Each task gradient gets an auxiliary term that increases the loss reduction it causes in the
other tasks (docs/methods.md §2):

    ĝ_i = g_i − γ_i Σ_{j≠i} H_i g_j,        update = Σ_i w_i ĝ_i

with the Hessian approximation ``diag``: H_i ≈ diag(g_i ⊙ g_i). The raw term is cubic in the
gradient scale, so a fixed raw γ is either invisible or explosive depending on the model. By default
H_i is therefore divided by its mean diagonal (``normalize=True``): H̃_i = diag(g_i⊙g_i)/mean(g_i⊙g_i)
is invariant to the scale of task i's loss and γ becomes a dimensionless strength (the correction is
about γ times the size of the other tasks' gradients, concentrated where g_i has most curvature).
``normalize=False`` gives the paper's raw form.
"""

from __future__ import annotations

import warnings

import torch

from cogradctl.methods.base import Method, per_task

# A correction whose size relative to the task gradient stays below this is invisible: warn once.
TINY_CORRECTION = 1e-4
TINY_STEPS_BEFORE_WARNING = 20


class CoGrad(Method):
    """CoGrad with the diagonal Hessian approximation (scale-free by default).

    >>> import torch
    >>> g = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    >>> # (g_1 - 0.5 g_1⊙g_1⊙g_2) + (g_2 - 0.5 g_2⊙g_2⊙g_1) = [0.5, 4] + [0.5, -2]
    >>> CoGrad(gamma=0.5, normalize=False)(g)
    tensor([1., 2.])
    """

    family = "transference"
    paper = "Gradient Coordination for Quantifying and Maximizing Knowledge Transference (SIGIR 2023)"
    options = {
        "gamma": "strength of the transference term: one value or one per task (default 0.1)",
        "hessian": "Hessian approximation: 'diag' (default)",
        "normalize": "divide H_i by its mean diagonal so gamma is scale-free (default true)",
        "weights": "task weights w_i: one value or one per task (default 1)",
    }

    def __init__(self, gamma=0.1, hessian: str = "diag", normalize: bool = True, weights=1.0) -> None:
        super().__init__()
        if hessian != "diag":
            raise ValueError(f"hessian must be 'diag', got {hessian!r}")
        self.gamma_option = gamma
        self.weights_option = weights
        self.hessian = hessian
        self.normalize = bool(normalize)
        self._tiny_steps = 0
        self._warned = False

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.gamma = per_task(self.gamma_option, num_tasks, "gamma")
        self.weights = per_task(self.weights_option, num_tasks, "weights")

    def corrections(self, grads: torch.Tensor) -> torch.Tensor:
        """The K×P matrix of auxiliary terms γ_i Σ_{j≠i} H_i g_j (O(KP), no extra backward)."""
        h = grads * grads  # diag(H_i), one row per task
        if self.normalize:
            mean = h.mean(dim=1, keepdim=True)
            h = torch.where(mean > 0, h / mean.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))
        others = grads.sum(dim=0, keepdim=True) - grads  # Σ_{j≠i} g_j
        gamma = self.gamma.to(grads)
        return gamma[:, None] * h * others

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        corr = self.corrections(grads)
        w = self.weights.to(grads)
        update = w @ (grads - corr)
        g_norm = grads.norm(dim=1)
        rel = torch.where(g_norm > 0, corr.norm(dim=1) / g_norm.clamp_min(1e-30), torch.zeros_like(g_norm))
        self.stats = {"relative_correction": rel.tolist()}
        self._warn_if_invisible(float(rel.max()))
        return update

    def task_weights(self) -> torch.Tensor | None:
        return self.weights

    def _warn_if_invisible(self, largest: float) -> None:
        self._tiny_steps = self._tiny_steps + 1 if largest < TINY_CORRECTION else 0
        if self._tiny_steps >= TINY_STEPS_BEFORE_WARNING and not self._warned:
            self._warned = True
            warnings.warn(
                f"cograd: the transference correction has stayed below {TINY_CORRECTION:g} of the task "
                f"gradients for {TINY_STEPS_BEFORE_WARNING} steps, so the update is practically 'ew'; "
                "raise gamma (or keep normalize=true)",
                stacklevel=2,
            )
