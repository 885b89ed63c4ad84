"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import numpy as np
import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram


def cagrad_weights(m: torch.Tensor, c: float, max_iter: int = 1000, tol: float = 1e-12,
                   start: torch.Tensor | None = None) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """Weights a (float64) with update Σ a_i g_i, from the K×K Gram matrix M; (a, fell_back).

    g0 = mean gradient, φ = c²‖g0‖². Solves min_{w ∈ simplex} g_wᵀ g0 + √φ ‖g_w‖ by projected
    gradient with backtracking, then a = 1/K + (√φ/‖g_w‖) w. If ‖g_w‖ vanishes at the optimum (the
    worst-case combination is zero) the mean gradient is returned (fell_back = True). ``start``: a
    point of the simplex to start from (the previous step's w: consecutive steps have similar
    gradients, so it converges in a few iterations); the final w is returned third.
    """
    k = m.shape[0]
    mean_w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = float(m.diagonal().max())
    if scale <= 0 or c == 0 or k == 1:
        return mean_w, False, None
    # The iterations run on K-vectors: numpy, whose per-operation overhead is a fraction of torch's.
    mm = (m / scale).double().cpu().numpy()
    mean = np.full(k, 1.0 / k)
    b = mm @ mean  # (g_i · g0)
    sqrt_phi = c * abs(float(mean @ b)) ** 0.5
    if sqrt_phi == 0.0:
        return mean_w, False, None

    def f(w: np.ndarray) -> float:
        return float(w @ b) + sqrt_phi * max(float(w @ mm @ w), 0.0) ** 0.5

    w = mean.copy()
    if start is not None and start.numel() == k and bool(torch.isfinite(start).all()) and abs(float(start.sum()) - 1.0) < 1e-6:
        w = _project_simplex(start.double().cpu().numpy())
    step = 1.0
    fw = f(w)
    for _ in range(max_iter):
        nw = max(float(w @ mm @ w), 0.0) ** 0.5
        grad = b + (sqrt_phi / nw) * (mm @ w) if nw > 1e-15 else b
        while True:
            cand = _project_simplex(w - step * grad)
            fc = f(cand)
            if fc <= fw - 1e-4 * float(grad @ (w - cand)) or step < 1e-14:
                break
            step *= 0.5
        change = float(np.abs(cand - w).max())
        w, fw = cand, fc
        step = min(step * 2.0, 1e6)
        if change <= tol:
            break
    gw = max(float(w @ mm @ w), 0.0) ** 0.5
    if gw <= 1e-9:
        return mean_w, True, None
    return torch.from_numpy(mean + (sqrt_phi / gw) * w), False, torch.from_numpy(w)


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based, exact)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, v.size + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


class CAGrad(Method):
    """CAGrad: maximise the worst task's improvement within a ball around the mean gradient.

    d = argmax_{‖d − g0‖ ≤ c‖g0‖} min_i g_iᵀd, with g0 the mean gradient; by duality
    d = g0 + (c‖g0‖/‖g_w‖) g_w, g_w = Σ_i w_i g_i for w minimising g_wᵀg0 + c‖g0‖‖g_w‖ on the
    simplex (solved on the K×K Gram matrix, float64). ``rescale=True`` divides d by 1 + c² (the
    official code's ``rescale=1``). c = 0 gives the mean gradient. Mean scale (as the paper).

    >>> import torch
    >>> CAGrad(c=0.0)(torch.tensor([[2.0, 0.0], [0.0, 4.0]]))
    tensor([1., 2.])
    """

    family = "gradient manipulation"
    paper = "Conflict-Averse Gradient Descent for Multi-task Learning (Liu et al., NeurIPS 2021)"
    options = {
        "c": "radius of the ball around the mean gradient, relative to its norm (default 0.4)",
        "rescale": "divide the update by 1 + c² (default false)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(self, c: float = 0.4, rescale: bool = False, granularity: str = "global") -> None:
        super().__init__(granularity)
        if float(c) < 0:
            raise ValueError("c must be non-negative")
        self.c = float(c)
        self.rescale = bool(rescale)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        # The previous step's simplex point w: the warm start of the next solve (state for resume).
        self.register_buffer("warm", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        weights, fell_back, w = cagrad_weights(gram(grads), self.c, start=self.warm)
        if w is not None:
            self.warm = w
        if self.rescale:
            weights = weights / (1.0 + self.c**2)
        self.stats = {"weights": weights.tolist(), "fallback_mean": fell_back}
        return combine(weights, grads)
