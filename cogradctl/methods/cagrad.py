"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import numpy as np
import torch

from cogradctl.methods.base import GRANULARITY_OPTION, Method, combine, gram, number
from cogradctl.methods.linalg import on_simplex, project_simplex, snap_to_simplex, solve_on_faces

# Up to this many tasks the inner problem is solved exactly, face by face (2^K − 1 small systems).
EXACT_MAX_TASKS = 12


def cagrad_weights(
    m: torch.Tensor, c: float, max_iter: int = 1000, tol: float = 1e-12, start: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """Weights a (float64) with update Σ a_i g_i, from the K×K Gram matrix M; (a, no_common_descent, w).

    g0 = mean gradient, φ = c²‖g0‖². Solves min_{w ∈ simplex} F(w) = g_wᵀ g0 + √φ ‖g_w‖, then
    a = 1/K + (√φ/‖g_w‖) w. K ≤ 12: exactly, by ``_faces_solve``. K > 12: projected gradient with
    backtracking from ``start`` (a point of the simplex, the previous step's w: consecutive steps
    have similar gradients, so it converges in a few iterations). If g_w vanishes at the optimum
    (the origin is in the gradients' convex hull and no point beats F = 0), no d improves every
    task and the best worst-task improvement is 0; every d of the ball with g_iᵀd ≥ 0 for all i
    attains it, and the one nearest g0 is taken (``_nearest_in_cone``; it lies in the ball because
    the optimal set is not empty), no_common_descent = True. The final w is returned third (None then).
    """
    k = m.shape[0]
    mean_w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    scale = float(m.diagonal().max())
    if scale <= 0 or c == 0 or k == 1:
        return mean_w, False, None
    # The algebra runs on K-vectors: numpy, whose per-operation overhead is a fraction of torch's.
    mm = (m / scale).double().cpu().numpy()
    mean = np.full(k, 1.0 / k)
    b = mm @ mean  # (g_i · g0)
    sqrt_phi = c * abs(float(mean @ b)) ** 0.5
    if sqrt_phi == 0.0:
        return mean_w, False, None
    if k <= EXACT_MAX_TASKS:
        w = _faces_solve(mm, b, sqrt_phi)
    else:
        w = _projected_gradient(mm, b, sqrt_phi, start, max_iter, tol)
    gw = max(float(w @ mm @ w), 0.0) ** 0.5 if w is not None else 0.0
    if w is None or gw <= 1e-9:
        return torch.from_numpy(mean + _nearest_in_cone(mm, b)), True, None
    return torch.from_numpy(mean + (sqrt_phi / gw) * w), False, torch.from_numpy(w)


def _nearest_in_cone(mm: np.ndarray, b: np.ndarray) -> np.ndarray:
    """μ ≥ 0 with g0 + Σ μ_i g_i the point of {d : g_iᵀd ≥ 0 ∀i} nearest g0 (b_i = g_iᵀg0).

    Its dual: min_{μ ≥ 0} ½ μᵀMμ + bᵀμ (scale-free: the same μ for M and M/s). K ≤ 12: every
    support S is tried at once (M_SS μ_S = −b_S, batched LU; singular faces are skipped, since an
    optimal μ on linearly independent gradients exists, by Carathéodory) and the best KKT point
    kept: μ_S ≥ 0 and g_iᵀd = (Mμ + b)_i ≥ 0 off S. K > 12: Hildreth's coordinate descent.
    """
    k = len(b)
    if k > EXACT_MAX_TASKS:
        return _hildreth(mm, b)
    masks = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1).astype(bool)  # the empty support too
    both = masks[:, :, None] & masks[:, None, :]
    lhs = np.where(both, mm[None], 0.0) + (np.eye(k, dtype=bool)[None] & ~masks[:, :, None])
    rhs = np.where(masks, -b[None], 0.0)[:, :, None]
    sol, info = torch.linalg.solve_ex(torch.from_numpy(lhs), torch.from_numpy(rhs))
    mu = sol.numpy()[:, :, 0]
    slack = mu @ mm + b  # g_iᵀd for each candidate
    tol = 1e-10 * (np.abs(mu) @ np.abs(mm) + np.abs(b) + 1e-300)
    ok = (info.numpy() == 0) & (mu >= -1e-10 * np.abs(mu).max(axis=1, keepdims=True)).all(axis=1)
    ok &= (masks | (slack >= -tol)).all(axis=1)
    mu = np.clip(mu, 0.0, None)
    value = np.where(ok, 0.5 * np.einsum("si,ij,sj->s", mu, mm, mu) + mu @ b, np.inf)
    return mu[int(np.argmin(value))]


def _hildreth(mm: np.ndarray, b: np.ndarray, sweeps: int = 10000, tol: float = 1e-13) -> np.ndarray:
    """min_{μ ≥ 0} ½ μᵀMμ + bᵀμ by exact minimisation along one coordinate at a time (Hildreth's
    method for the projection on a polyhedral cone; converges for any PSD M, zero rows skipped)."""
    k = len(b)
    mu, grad = np.zeros(k), b.astype(np.float64).copy()  # grad = Mμ + b
    for _ in range(sweeps):
        largest = 0.0
        for i in range(k):
            if mm[i, i] <= 0:
                continue
            new = max(mu[i] - grad[i] / mm[i, i], 0.0)
            if new != mu[i]:
                grad += (new - mu[i]) * mm[:, i]
                largest = max(largest, abs(new - mu[i]) * mm[i, i] ** 0.5)
                mu[i] = new
        if largest <= tol:
            break
    return mu


def _faces_solve(mm: np.ndarray, b: np.ndarray, sp: float) -> np.ndarray | None:
    """Exact minimiser of F(w) = wᵀb + sp·√(wᵀMw) on the simplex, or None if it has g_w = 0.

    On a face S (the support of w) with g_w ≠ 0, stationarity is s·M_SS w_S = λ1 − b_S with
    s = sp/‖g_w‖, and Σw = 1. Both bordered systems K_S [p; α] = [0; 1] and K_S [q; β] = [−b_S; 0]
    (K_S = [[M_SS, 1], [1ᵀ, 0]]) are solved for every face at once; then w = p + q/s, and
    ‖g_w‖² = pᵀMp − qᵀb_S/s² (pᵀMq = 0 since Σq = 0) with ‖g_w‖ = sp/s gives
    s² = (sp² + qᵀb_S) / pᵀMp. Every w ≥ 0 so found is a point of the simplex, so the smallest F
    among them is an upper bound of the minimum; it is the minimum because an optimal g_w ≠ 0
    lies in the hull of an affinely independent subset of the gradients (Carathéodory), whose
    K_S is invertible and whose face holds the stationarity above (so singular faces are
    skipped). If no candidate has F < 0 and the origin is in the hull (the min-norm point p, the
    same faces' MGDA solution, is 0), the minimum is F = 0 at g_w = 0: None. Cost: 2^K − 1
    batched LU solves of size K + 1 (K = 8: about 0.2 ms; K = 12: about 10 ms).
    """
    p, q, solved = solve_on_faces(mm, b)  # singular faces: solved False, skipped
    pmp = np.einsum("si,ij,sj->s", p, mm, p)
    # The MGDA part: is the origin in the hull (min-norm point of a feasible face ~ 0)?
    p_ok = solved & on_simplex(p)
    origin_inside = bool((p_ok & (pmp <= 1e-14)).any())
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = (sp * sp + q @ b) / pmp
        w = p + q / np.sqrt(s2)[:, None]
    ok = solved & (pmp > 1e-14) & (s2 > 0) & np.isfinite(w).all(axis=1)
    ok &= on_simplex(w)
    if not ok.any():
        return None
    w = snap_to_simplex(np.where(ok[:, None], w, 0.0))
    f = w @ b + sp * np.sqrt(np.clip(np.einsum("si,ij,sj->s", w, mm, w), 0.0, None))
    f = np.where(ok, f, np.inf)
    best = int(np.argmin(f))
    if origin_inside and f[best] >= 0:
        return None
    return w[best].copy()


def _projected_gradient(
    mm: np.ndarray, b: np.ndarray, sp: float, start: torch.Tensor | None, max_iter: int, tol: float
) -> np.ndarray:
    """F's minimiser on the simplex by projected gradient with backtracking (K > 12)."""
    k = mm.shape[0]

    def f(w: np.ndarray) -> float:
        return float(w @ b) + sp * max(float(w @ mm @ w), 0.0) ** 0.5

    w = np.full(k, 1.0 / k)
    if (
        start is not None
        and start.numel() == k
        and bool(torch.isfinite(start).all())
        and abs(float(start.sum()) - 1.0) < 1e-6
    ):
        w = project_simplex(start.detach().cpu().double()).numpy()
    step = 1.0
    fw = f(w)
    for _ in range(max_iter):
        nw = max(float(w @ mm @ w), 0.0) ** 0.5
        grad = b + (sp / nw) * (mm @ w) if nw > 1e-15 else b
        while True:
            cand = project_simplex(torch.from_numpy(w - step * grad)).numpy()
            fc = f(cand)
            if fc <= fw - 1e-4 * float(grad @ (w - cand)) or step < 1e-14:
                break
            step *= 0.5
        change = float(np.abs(cand - w).max())
        w, fw = cand, fc
        step = min(step * 2.0, 1e6)
        if change <= tol:
            break
    return w


class CAGrad(Method):
    """CAGrad: maximise the worst task's improvement within a ball around the mean gradient.

    d = argmax_{‖d − g0‖ ≤ c‖g0‖} min_i g_iᵀd, with g0 the mean gradient; by duality
    d = g0 + (c‖g0‖/‖g_w‖) g_w, g_w = Σ_i w_i g_i for w minimising g_wᵀg0 + c‖g0‖‖g_w‖ on the
    simplex (solved on the K×K Gram matrix, float64). ``rescale=True`` divides d by 1 + c² (the
    official code's ``rescale=1``). c = 0 gives the mean gradient. Mean scale (as the paper).
    An unobserved task (``observed``) is left out: the problem is solved over the observed tasks
    (g0 their mean, the worst task among them), as if the model had only those; the warm start
    keeps the unobserved task's entry.

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
        self.c = number("c", c)
        self.rescale = bool(rescale)

    def setup(self, num_tasks: int) -> None:
        super().setup(num_tasks)
        # The previous step's simplex point w: the warm start of the next solve (state for resume).
        self.register_buffer("warm", torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64))

    def aggregate(self, grads: torch.Tensor, losses: torch.Tensor | None) -> torch.Tensor:
        rows = self.observed_rows
        if rows is not None:
            return self._aggregate_observed(grads, rows)
        weights, no_common_descent, w = cagrad_weights(gram(grads), self.c, start=self.warm)
        if w is not None:
            self.warm = w
        if self.rescale:
            weights = weights / (1.0 + self.c**2)
        self.stats = {"weights": weights.tolist(), "no_common_descent": no_common_descent}
        return combine(weights, grads)

    def _aggregate_observed(self, grads: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """``aggregate`` over the observed tasks ``rows`` (the unobserved ones get weight 0)."""
        mass = float(self.warm[rows].sum())
        start = self.warm[rows] / mass if mass > 0 else None
        weights, no_common_descent, w = cagrad_weights(self.observed_gram(grads), self.c, start=start)
        if w is not None:
            warm = self.warm.clone()
            warm[rows] = w.to(warm) * (mass if mass > 0 else 1.0)
            self.warm = warm
        if self.rescale:
            weights = weights / (1.0 + self.c**2)
        weights = self.spread(weights)
        self.stats = {"weights": weights.tolist(), "no_common_descent": no_common_descent}
        return combine(weights, grads)
