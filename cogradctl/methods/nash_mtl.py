"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram, integer, number

# Relative residual max_i |(Mα)_i α_i − 1| at which Newton stops: the weights count as converged.
TOL = 1e-10
EPS64 = float(np.finfo(np.float64).eps)


def nash_weights(
    m: torch.Tensor, start: torch.Tensor | None, max_iter: int = 500, tol: float = TOL
) -> tuple[torch.Tensor, int, float, bool]:
    """α > 0 with (Mα)_i = 1/α_i for the active tasks (float64); (α, iterations, residual, converged).

    The equation is the stationarity condition of the strictly convex, self-concordant
    f(α) = ½ αᵀMα − Σ_i log α_i, solved in the Jacobi-scaled variable β = diag(M)^{1/2} α with a
    ridge 1e-10·I on the scaled (unit-diagonal) matrix, which gives a solution when the gradients are
    linearly dependent (more if round-off made that matrix indefinite), by damped Newton
    (``_newton``). Tasks whose gradient is zero get α_i = 0.

    Starts: ``start`` (the previous step's α, or None) and the solution for orthogonal gradients
    (β = 1). Each is first moved along its ray to the best multiple (``_on_best_ray``), so a start
    of the right shape but the wrong scale costs nothing; the one with the lower f is tried first,
    since damped Newton's iteration count grows with f(start) − min f. If it stops at ``max_iter``
    unconverged, the other is tried; the iterations of both are counted. ``residual`` is
    max_i |(Mα)_i α_i − 1|; converged means it is at most ``tol`` or at the round-off floor of its
    own evaluation (see ``_newton``).
    """
    k = m.shape[0]
    mm = m.double().cpu().numpy()
    diag = mm.diagonal()
    alpha = torch.zeros(k, dtype=torch.float64)
    if k == 0 or diag.max() <= 0:
        return alpha, 0, 0.0, True
    idx = np.flatnonzero(diag > diag.max() * 1e-24)
    # Jacobi scaling α = Dβ, D = diag(M)^{-1/2}: (Mα)_i = 1/α_i ⇔ (DMD β)_i = 1/β_i, and DMD has a
    # unit diagonal, so the Newton systems stay well conditioned whatever the gradients' norms.
    dscale = diag[idx] ** -0.5
    ma = dscale[:, None] * mm[np.ix_(idx, idx)] * dscale[None, :]
    # The ridge: 1e-10, plus twice any negative eigenvalue, which only round-off can cause (a float32
    # Gram matrix of dependent gradients): an indefinite matrix would leave f unbounded below.
    ma += (1e-10 + max(0.0, -2.0 * float(np.linalg.eigvalsh(ma)[0]))) * np.eye(len(idx))
    candidates = [_on_best_ray(ma, np.ones(len(idx)))]
    if start is not None:
        warm = start.double().cpu().numpy()[idx] / dscale
        # a task that had no gradient (α_i = 0) starts where the orthogonal solution puts it
        candidates.append(_on_best_ray(ma, np.where(np.isfinite(warm) & (warm > 0), warm, 1.0)))
    candidates.sort(key=lambda b: _objective(ma, b))
    total = 0
    for b in candidates:
        b, it, res, converged = _newton(ma, b, max_iter, tol)
        total += it
        if converged:
            break
    alpha[torch.from_numpy(idx)] = torch.from_numpy(b * dscale)
    return alpha, total, res, converged


def _on_best_ray(ma: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The multiple t·b minimising f: d/dt [½t² bᵀMb − Σ log(t b_i)] = 0 gives t² bᵀMb = K."""
    return b * (len(b) / float(b @ ma @ b)) ** 0.5


def _objective(ma: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(b @ ma @ b) - float(np.log(b).sum())


def _newton(ma: np.ndarray, b: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int, float, bool]:
    """Damped Newton on f from b (step 1/(1 + Newton decrement), which keeps b positive and
    converges from any positive start); (b, iterations, residual, converged).

    It stops when the relative residual r_i = (Mβ)_i β_i − 1 is at most ``tol``, or at most the
    round-off of its own evaluation, K·eps·β_i (|M| β)_i: with (nearly) dependent gradients the
    ridge makes β large while (Mβ)_i = 1/β_i is small, so the sum cancels and no iterate can do
    better (collinear opposite gradients: β ≈ 7e4, a floor of about 1e-6). In numpy: K-vectors,
    where each torch call's fixed cost would dominate.
    """
    k = len(b)
    res, converged = float("inf"), False
    for it in range(max_iter + 1):
        mb = ma @ b
        grad = mb - 1.0 / b
        r = np.abs(grad * b)
        res = float(r.max())
        converged = bool((r <= tol + k * EPS64 * b * (np.abs(ma) @ b)).all())
        if converged or it == max_iter:
            return b, it, res, converged
        step = np.linalg.solve(ma + np.diag(1.0 / (b * b)), -grad)
        decrement = max(float(-grad @ step), 0.0) ** 0.5
        b = np.maximum(b + step / (1.0 + decrement), 1e-300)
    return b, max_iter, res, converged


class NashMTL(Method):
    """Nash-MTL: the update Σ α_i g_i with α the Nash bargaining solution (Mα)_i = 1/α_i.

    M = G Gᵀ, so the update d satisfies dᵀg_i = 1/α_i. Solved in the Jacobi-scaled variable (unit
    diagonal, whatever the gradients' norms) to a relative residual of 1e-10 by damped Newton (no
    cvxpy), from the better (lower objective) of the previous step's α (a buffer) and the
    orthogonal-gradients solution, each first rescaled to its best multiple; if the first does not
    converge within ``max_iter`` the other is tried. ``stats['converged']`` says whether the weights
    met the tolerance (a warning is given the first time they do not). ``update_every`` reuses α for
    that many steps. The update
    is clipped to norm ``max_norm`` (0: no clipping), as the official code does. Zero gradients get
    weight 0; all-zero gradients give a zero update. An unobserved task (``observed``) is left out:
    α is solved over the observed tasks (from their previous α) and the unobserved task's α is kept
    for the steps that observe it again; a step that reuses α (``update_every``) gives it weight 0.

    >>> import torch
    >>> NashMTL(max_norm=0)(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))   # α = (1, 1/2): dᵀg_i = 1/α_i
    tensor([1., 1.])
    """

    family = "gradient manipulation"
    paper = "Multi-Task Learning as a Bargaining Game (Navon et al., ICML 2022)"
    options = {
        "max_norm": "clip the update to this norm, 0 = no clipping (default 1.0)",
        "update_every": "recompute α every this many steps (default 1)",
        "max_iter": "Newton iteration cap per start (default 500; it stops at a relative residual of 1e-10)",
        "granularity": GRANULARITY_OPTION,
    }

    def __init__(
        self, max_norm: float = 1.0, update_every: int = 1, max_iter: int = 500, granularity: str = "global"
    ) -> None:
        super().__init__(granularity)
        self.max_norm = number("max_norm", max_norm)
        self.update_every = integer("update_every", update_every, 1)
        self.max_iter = integer("max_iter", max_iter, 1)
        self._warned = False

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        self.register_buffer("alpha", torch.ones(self.num_blocks, num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros(self.num_blocks, dtype=torch.long))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        b = self.block
        iters, res, converged = 0, 0.0, True
        rows = self.observed_rows
        if int(self.steps[b]) % self.update_every == 0:
            start = self.alpha[b] if int(self.steps[b]) > 0 else None  # the previous step's α
            if rows is None:
                alpha, iters, res, converged = nash_weights(gram(grads), start, self.max_iter)
                self.alpha[b] = alpha.to(self.alpha)
            else:  # over the observed tasks; the unobserved ones keep their α
                start = None if start is None else start[rows]
                alpha, iters, res, converged = nash_weights(self.observed_gram(grads), start, self.max_iter)
                self.alpha[b, rows] = alpha.to(self.alpha)
            self._warn_if_unconverged(converged, res, iters)
        self.steps[b] += 1
        alpha = self.alpha[b].to(torch.float64).cpu()
        if rows is not None:
            alpha = self.spread(alpha[rows])
        update = combine(alpha, grads)
        clipped = False
        if self.max_norm > 0:
            n = float(update.norm())
            if n > self.max_norm:
                update = update * (self.max_norm / n)
                clipped = True
        self.stats = {
            "weights": alpha.tolist(),
            "iterations": float(iters),
            "residual": res,
            "converged": converged,
            "clipped": clipped,
        }
        return update

    def _warn_if_unconverged(self, converged: bool, res: float, iters: int) -> None:
        if not converged and not self._warned:
            self._warned = True
            warnings.warn(
                f"nash-mtl: Newton stopped after {iters} iterations at a relative residual of {res:.3g} "
                f"(target {TOL:g}); this step's weights are not the Nash solution (stats['converged'] "
                "is false for every such step). Raise max_iter.",
                stacklevel=3,
            )
