"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram


def nash_weights(m: torch.Tensor, start: torch.Tensor, max_iter: int = 500, tol: float = 1e-10) -> tuple[torch.Tensor, int, float]:
    """α > 0 with (Mα)_i = 1/α_i for the active tasks (float64); returns (α, iterations, residual).

    The equation is the stationarity condition of the strictly convex, self-concordant
    f(α) = ½ αᵀMα − Σ_i log α_i, solved in the Jacobi-scaled variable β = diag(M)^{1/2} α with a
    ridge 1e-10·I on the scaled (unit-diagonal) matrix, which gives a solution when the gradients are
    linearly dependent, minimised by damped Newton from ``start`` (step
    1/(1 + Newton decrement), which keeps α positive). Tasks whose gradient is zero get α_i = 0.
    """
    k = m.shape[0]
    diag = m.diagonal()
    top = float(diag.max()) if k else 0.0
    alpha = torch.zeros(k, dtype=torch.float64)
    if top <= 0:
        return alpha, 0, 0.0
    active = diag > top * 1e-24
    idx = torch.nonzero(active).flatten()
    # Jacobi scaling α = Dβ, D = diag(M)^{-1/2}: (Mα)_i = 1/α_i ⇔ (DMD β)_i = 1/β_i, and DMD has a
    # unit diagonal, so the Newton systems stay well conditioned whatever the gradients' norms.
    dscale = diag[idx].rsqrt()
    ma = dscale[:, None] * m[idx][:, idx] * dscale[None, :] + 1e-10 * torch.eye(len(idx), dtype=torch.float64)
    a = (start[idx].to(torch.float64) / dscale).clone()
    a = torch.where((a > 0) & torch.isfinite(a), a, torch.ones_like(a))
    it, res = 0, float("inf")
    for it in range(1, max_iter + 1):
        grad = ma @ a - 1.0 / a
        res = float((grad * a).abs().max())  # relative residual: |(Mα)_i α_i − 1|
        if res <= tol:
            break
        hess = ma + torch.diag(1.0 / (a * a))
        step = torch.linalg.solve(hess, -grad)
        decrement = float((-grad @ step).clamp_min(0)) ** 0.5
        a = a + step / (1.0 + decrement)
        a = a.clamp_min(1e-300)
    a = a * dscale
    alpha[idx] = a
    return alpha, it, res


class NashMTL(Method):
    """Nash-MTL: the update Σ α_i g_i with α the Nash bargaining solution (Mα)_i = 1/α_i.

    M = G Gᵀ, so the update d satisfies dᵀg_i = 1/α_i. Solved on M/‖M‖_F for conditioning (as the
    official code) and rescaled, to a tight tolerance by damped Newton (no cvxpy), warm-started
    from the previous step's α (a buffer); ``update_every`` reuses α for that many steps. The update
    is clipped to norm ``max_norm`` (0: no clipping), as the official code does. Zero gradients get
    weight 0; all-zero gradients give a zero update.

    >>> import torch
    >>> NashMTL(max_norm=0)(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))   # α = (1, 1/2): dᵀg_i = 1/α_i
    tensor([1., 1.])
    """

    family = "gradient manipulation"
    paper = "Multi-Task Learning as a Bargaining Game (Navon et al., ICML 2022)"
    options = {
        "max_norm": "clip the update to this norm, 0 = no clipping (default 1.0)",
        "update_every": "recompute α every this many steps (default 1)",
        "max_iter": "Newton iteration cap (default 500; it stops at a relative residual of 1e-10)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(self, max_norm: float = 1.0, update_every: int = 1, max_iter: int = 500, granularity: str = "global") -> None:
        super().__init__(granularity)
        if float(max_norm) < 0 or int(update_every) < 1 or int(max_iter) < 1:
            raise ValueError("max_norm must be ≥ 0, update_every and max_iter ≥ 1")
        self.max_norm = float(max_norm)
        self.update_every = int(update_every)
        self.max_iter = int(max_iter)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.register_buffer("alpha", torch.ones(self.num_blocks, num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(self.num_blocks, dtype=torch.long))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        b = self.block
        iters, res = 0, 0.0
        if int(self.steps[b]) % self.update_every == 0:
            m = gram(grads)
            norm = float(torch.linalg.matrix_norm(m))
            if norm > 0:
                # Solved on M/‖M‖_F for conditioning (warm start in that scale), α rescaled to M.
                start = self.alpha[b].cpu() * norm**0.5
                if int(self.steps[b]) == 0:  # cold start: the solution for orthogonal gradients
                    start = (m.diagonal() / norm).clamp_min(1e-300).rsqrt()
                alpha, iters, res = nash_weights(m / norm, start, self.max_iter)
                alpha = alpha / norm**0.5
            else:
                alpha = torch.zeros_like(self.alpha[b])
            self.alpha[b] = alpha.to(self.alpha)
        self.steps[b] += 1
        alpha = self.alpha[b].to(torch.float64).cpu()
        update = combine(alpha, grads)
        clipped = False
        if self.max_norm > 0:
            n = float(update.norm())
            if n > self.max_norm:
                update = update * (self.max_norm / n)
                clipped = True
        self.stats = {"weights": alpha.tolist(), "iterations": float(iters), "residual": res, "clipped": clipped}
        return update
