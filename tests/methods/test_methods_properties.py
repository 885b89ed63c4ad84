"""Defining properties of the gradient-manipulation methods (docs/methods.md)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cogradctl.methods import get_method
from cogradctl.methods.base import _GRAM_CHUNK, gram

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def matrices(draw, kmin=2, kmax=5, pmax=6):
    k = draw(st.integers(kmin, kmax))
    p = draw(st.integers(2, pmax))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(k, 1, generator=gen, dtype=torch.float64) * 2)
    return torch.randn(k, p, generator=gen, dtype=torch.float64) * scales


def brute_min_norm(m: torch.Tensor) -> torch.Tensor:
    """Min of αᵀMα over the simplex by enumerating supports (KKT of each face), float64."""
    k = m.shape[0]
    best, best_val = None, float("inf")
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            idx = list(support)
            ms = m[idx][:, idx]
            kkt = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            kkt[:r, :r] = ms
            kkt[:r, r] = 1
            kkt[r, :r] = 1
            rhs = torch.zeros(r + 1, dtype=torch.float64)
            rhs[r] = 1
            sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution.squeeze(1)
            a = torch.zeros(k, dtype=torch.float64)
            a[idx] = sol[:r]
            if (a < -1e-12).any() or abs(float(a.sum()) - 1) > 1e-9:
                continue
            val = float(a @ m @ a)
            if val < best_val:
                best, best_val = a, val
    return best


# ---- PCGrad ---------------------------------------------------------------------------------


@SETTINGS
@given(matrices(kmin=2, kmax=2))
def test_pcgrad_k2_update_never_conflicts_with_a_task(g):
    """K = 2: each projected g_i^PC is orthogonal to g_j if they conflicted, so d·g_i ≥ 0 for both."""
    d = get_method("pcgrad")(g)
    for i in range(2):
        assert float(d @ g[i]) >= -1e-9 * float(g.norm()) ** 2


def test_pcgrad_no_conflict_is_the_sum():
    g = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.3, 0.3]])
    assert torch.allclose(get_method("pcgrad")(g), g.sum(0))


def test_pcgrad_seeded_order_is_deterministic():
    g = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(get_method("pcgrad", seed=7)(g), get_method("pcgrad", seed=7)(g))


# ---- Gram matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8])  # K ≤ 4: column by column; K = 8: the K×K-tile product
@pytest.mark.parametrize("p", [5, 3 * _GRAM_CHUNK + 17, 4 * _GRAM_CHUNK])
def test_gram_matches_float64_product(p, k):
    """Blocks, tail and the single-matmul path all agree with a float64 product: float32 dot
    products of at most 2·_GRAM_CHUNK terms, summed in float64, err by ~√chunk·eps ≈ 1e-5 at worst."""
    scales = torch.tensor([1.0, 3.0, 0.1, 1.0] * 2)[:k, None]
    g = torch.randn(k, p, generator=torch.Generator().manual_seed(p)) * scales
    m = gram(g)
    ref = g.double() @ g.double().T
    assert m.dtype == torch.float64 and torch.equal(m, m.T)
    assert float((m - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("k", [2, 4, 8])
def test_gram_is_accurate_for_a_million_columns(k):
    """P = 2^20 with correlated rows: the block sums keep the error at float32 resolution of the
    inputs. Each block's dot product of 2^14 terms errs by ~√(2^14)·eps·|x||y| ≈ 8e-6 of its size
    (random walk, one accumulator); 64 independent block errors summed in float64 give ~1e-6 of
    the whole, so 4e-6 holds. A single float32 product of 2^20 terms errs by ~√(2^20)·eps ≈ 6e-5
    (measured 2e-5–7e-5 for ``g @ g.T``), over ten times that bound."""
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(k, 1 << 20, generator=gen) + 0.3 * torch.randn(1, 1 << 20, generator=gen)
    m = gram(g)
    ref = g.double() @ g.double().T
    assert torch.equal(m, m.T)
    assert float((m - ref).abs().max()) <= 4e-6 * float(ref.abs().max())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_solve_small_matches_lapack(k, seed):
    """Against ``np.linalg.solve`` (LAPACK gesv) on random, badly scaled systems with several
    right-hand sides: the same algorithm, so agreement to a few ulps times the condition number."""
    from cogradctl.methods.linalg import solve_small

    rng = np.random.default_rng(seed)
    m = rng.standard_normal((k, k)) * np.exp(2 * rng.standard_normal((k, 1)))
    b = rng.standard_normal((k, 3))
    x = np.array(solve_small(m.tolist(), b.T.tolist())).T
    ref = np.linalg.solve(m, b)
    assert np.allclose(x, ref, rtol=0, atol=1e-13 * np.linalg.cond(m) * np.abs(ref).max())


def test_solve_small_pivots_and_reports_exactly_singular():
    from cogradctl.methods.linalg import solve_small

    # a zero leading entry needs the row swap; without it the first pivot is 0
    assert solve_small([[0.0, 1.0], [1.0, 0.0]], [[2.0, 3.0]]) == [[3.0, 2.0]]
    assert solve_small([[1.0, 2.0], [2.0, 4.0]], [[1.0, 1.0]]) is None  # rank 1: the second pivot is exactly 0
    assert solve_small([[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]]) is None


# ---- MGDA ---------------------------------------------------------------------------------


@SETTINGS
@given(matrices(kmin=2, kmax=5))
def test_mgda_is_the_min_norm_point_of_the_convex_hull(g):
    m = gram(g)
    ref = brute_min_norm(m) @ g
    d = get_method("mgda")(g)
    scale = float(m.diagonal().max()) ** 0.5
    assert float(d.norm()) <= float(ref.norm()) + 1e-7 * scale
    assert torch.allclose(d, ref, atol=1e-5 * scale)


def test_mgda_singular_gram_is_solved_on_the_faces():
    """g3 = g1 + g2 makes M singular (the interior solve M⁻¹1 fails or is rejected), while the
    bordered systems of the faces are not: the answer is the midpoint of the segment [g1, g2]."""
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(get_method("mgda")(g), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), atol=1e-12)
    # and a rank-2 M with four tasks, against the brute-force oracle
    g4 = torch.cat([g, (0.3 * g[0] + 0.7 * g[1])[None]])
    assert torch.allclose(get_method("mgda")(g4), brute_min_norm(gram(g4)) @ g4, atol=1e-6)


def test_mgda_k2_closed_form_and_permutation_equivariance():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    d = get_method("mgda")(g)
    assert torch.allclose(d, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-9)
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(get_method("mgda")(g[perm]), d, atol=1e-9)


# ---- IMTL-G --------------------------------------------------------------------------------


@SETTINGS
@given(matrices(kmin=2, kmax=4, pmax=8))
def test_imtlg_equal_projections_on_unit_gradients(g):
    g = torch.cat([g, torch.randn(g.shape[0], g.shape[0], dtype=torch.float64)], dim=1)  # full row rank
    m = get_method("imtl-g")
    d = m(g)
    proj = (g @ d) / g.norm(dim=1)
    assert torch.allclose(proj, proj.mean().expand_as(proj), rtol=1e-6, atol=1e-9 * float(d.norm()))
    if not m.stats["fallback_l1"]:
        assert abs(sum(m.stats["weights"]) - 1) < 1e-9


def cosines(g: torch.Tensor) -> np.ndarray:
    """The cosine matrix C_ij = g_iᵀg_j / (‖g_i‖‖g_j‖) in float64 numpy (independent of ``gram``)."""
    u = (g / g.norm(dim=1, keepdim=True)).numpy()
    return u @ u.T


def imtlg_reference(g: torch.Tensor) -> np.ndarray:
    """IMTL-G's weights from numpy's pseudo-inverse of the cosine matrix (cut 10·K·eps·λ_max, as
    documented): α_i = (C⁺1)_i / ‖g_i‖, normalised to Σα = 1, or by its L1 norm if Σα ≤ 1e-12·‖α‖₁."""
    k = g.shape[0]
    beta = np.linalg.pinv(cosines(g), rcond=10 * k * 2.0**-52, hermitian=True) @ np.ones(k)
    alpha = beta / g.norm(dim=1).numpy()
    return alpha / (alpha.sum() if alpha.sum() > 1e-12 * np.abs(alpha).sum() else np.abs(alpha).sum())


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtlg_direct_solve_is_the_pseudo_inverse_when_well_conditioned(k, seed):
    """K ≤ 4: a well-conditioned cosine matrix is solved directly (closed form for K = 2); that must
    be C⁺1, the eigh-based pseudo-inverse path, and numpy's pinv (float64, independent), to
    round-off."""
    from cogradctl.methods.imtl_g import _pinv_ones, _solve_direct

    gen = torch.Generator().manual_seed(seed)
    g = (
        torch.randn(k, 50, generator=gen, dtype=torch.float64)
        * torch.tensor([1.0, 3.0, 0.2, 10.0][:k], dtype=torch.float64)[:, None]
    )
    c = cosines(g)
    direct = _solve_direct(c.tolist())
    assert direct is not None
    ref = np.linalg.pinv(c) @ np.ones(k)
    assert np.allclose(direct, ref, rtol=1e-12, atol=0)
    assert np.allclose(_pinv_ones(c.tolist()), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-5])
def test_imtlg_near_singular_gram_takes_the_pseudo_inverse(eps):
    """g4 = 0.3 g1 + 0.7 g2 (+ a small independent part): cond(C) far above 1e8, so the direct solve
    declines and the pseudo-inverse of C decides. Against numpy's pinv with the documented cut-off
    and normalisation (``imtlg_reference``): with eps = 0 and 1e-12 the small eigenvalue is dropped;
    with 1e-5 (cond ≈ 1e10) it is kept, the weights sum to about 0 and the L1 fallback applies, so
    the weights are compared at cond·eps64 ≈ 1e-5."""
    from cogradctl.methods.imtl_g import _solve_direct

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    g4 = torch.cat([g, (0.3 * g[0] + 0.7 * g[1] + eps * torch.randn(40, generator=gen, dtype=torch.float64))[None]])
    assert _solve_direct(cosines(g4).tolist()) is None
    alpha = imtlg_reference(g4)
    method = get_method("imtl-g")
    method(g4)
    assert method.stats["fallback_l1"] == (eps == 1e-5)
    assert np.allclose(method.stats["weights"], alpha, rtol=0, atol=1e-5 * np.abs(alpha).max())


def _spread_norms_case(gen: torch.Generator, k: int, p: int, low: float = -6.0, high: float = 6.0) -> torch.Tensor:
    """Random unit directions times norms 10^U(low, high)."""
    u = torch.randn(k, p, generator=gen, dtype=torch.float64)
    norms = 10.0 ** (low + (high - low) * torch.rand(k, 1, generator=gen, dtype=torch.float64))
    return u / u.norm(dim=1, keepdim=True) * norms


def test_imtlg_equal_projections_whatever_the_norms():
    """150 random cases, K = 2–6, P = K+3…K+20, norms spread over 1e-6…1e6 (so M's condition number
    reaches 1e24 while the cosine matrix's stays that of random directions, ≲ 1e3 here): the
    projections g_iᵀd/‖g_i‖ must be equal to 1e-10 relative. The solve on C errs by about
    cond(C)·eps ≈ 1e-13 and evaluating the projections in float64 by about P·eps·‖d‖/proj
    (measured: at most 6.5e-15). Before, the pseudo-inverse of M dropped the small tasks (its cut is
    relative to λ_max(M)): 115 of these 150 cases failed, the projections up to 2.6 times apart."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(150):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        g = _spread_norms_case(gen, k, k + int(torch.randint(3, 21, (1,), generator=gen)))
        method = get_method("imtl-g")
        d = method(g)
        proj = (g @ d) / g.norm(dim=1)
        assert float((proj - proj.mean()).abs().max()) <= 1e-10 * float(proj.abs().mean()), (proj, method.stats)


def test_imtlg_norms_orders_of_magnitude_apart_against_60_digits():
    """Regression (issue #20): norms 1e3, 1e-1, 1e5 at P = 1000, the second row nudged towards the
    first by 1e-4 of its norm. The weights against M⁻¹n solved in 60-digit arithmetic (mpmath, from
    the exact float64 inputs), to 1e-12 relative: the solve on the cosine matrix (cond ≈ 1) errs by a
    few ulps, the float64 Gram matrix by about √P·eps (measured: 2e-16). Before: the small task's
    weight 1.7e-4 off and the projections unequal by 1.0e-4 relative (the direct solve declined on
    M's condition bound, cond(M) ≈ 1e12, and the eigh pseudo-inverse of M lost the small task)."""
    mpmath = pytest.importorskip("mpmath")
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 1000, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    u[1] = u[1] + 1e-4 * u[0]
    g = u / u.norm(dim=1, keepdim=True) * torch.tensor([1e3, 1e-1, 1e5], dtype=torch.float64)[:, None]
    method = get_method("imtl-g")
    d = method(g)
    proj = (g @ d) / g.norm(dim=1)
    assert float((proj - proj.mean()).abs().max()) <= 1e-12 * float(proj.abs().mean())
    with mpmath.workdps(60):
        rows = [[mpmath.mpf(x) for x in row] for row in g.tolist()]
        m = mpmath.matrix([[mpmath.fsum(a * b for a, b in zip(r, s)) for s in rows] for r in rows])
        sol = mpmath.lu_solve(m, mpmath.matrix([mpmath.sqrt(m[i, i]) for i in range(3)]))
        ref = np.array([float(sol[i] / mpmath.fsum(sol)) for i in range(3)])
    assert np.allclose(method.stats["weights"], ref, rtol=1e-12, atol=0)


# ---- CAGrad ------------------------------------------------------------------------------


@SETTINGS
@given(matrices(kmin=1, kmax=5))
def test_cagrad_c0_is_the_mean(g):
    assert torch.allclose(get_method("cagrad", c=0.0)(g), g.mean(0), atol=1e-12)


@SETTINGS
@given(matrices(kmin=2, kmax=4))
def test_cagrad_stays_in_its_ball_and_improves_the_worst_task(g):
    c = 0.5
    d = get_method("cagrad", c=c)(g)
    g0 = g.mean(0)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-6) + 1e-12
    assert float((g @ d).min()) >= float((g @ g0).min()) - 1e-6 * float(g.norm()) ** 2


def _best_worst_task_improvement_on_a_grid(g: torch.Tensor, c: float, n: int = 600) -> torch.Tensor:
    """min_i g_iᵀd at every point d of a polar grid over CAGrad's ball ‖d − g0‖ ≤ c‖g0‖ (P = 2)."""
    g0 = g.mean(0)
    radius = c * float(g0.norm())
    theta = torch.linspace(0, 2 * torch.pi, 4 * n, dtype=torch.float64)
    rho = torch.linspace(0, radius, n, dtype=torch.float64)
    d = g0 + (rho[:, None, None] * torch.stack([theta.cos(), theta.sin()], dim=1)[None]).reshape(-1, 2)
    return (d @ g.T).min(dim=1).values


@SETTINGS
@given(matrices(kmin=2, kmax=5, pmax=2), st.sampled_from([0.2, 0.4, 0.8, 1.5]))
def test_cagrad_maximises_the_worst_task_improvement_brute_force(g, c):
    """CAGrad's d = argmax over the ball of min_i g_iᵀd (its primal definition, docs/methods.md):
    checked in P = 2 against every point of a dense grid over the ball. Ours must be at least as
    good as each grid point (they are all feasible), up to float64 round-off; and the grid's best
    is within one grid cell (Lipschitz constant max‖g_i‖) of ours, so a wrong optimum fails."""
    g = g[:, :2]
    d = get_method("cagrad", c=c)(g)
    ours = float((g @ d).min())
    grid = _best_worst_task_improvement_on_a_grid(g, c)
    scale = float(g.norm(dim=1).max())
    radius = c * float(g.mean(0).norm())
    assert ours >= float(grid.max()) - 1e-9 * scale * (scale + radius)
    cell = radius * (2 * torch.pi / (4 * 600) + 1 / 600)
    assert ours <= float(grid.max()) + 2 * cell * scale + 1e-12


def cagrad_oracle(g: torch.Tensor, c: float) -> tuple[float, np.ndarray]:
    """CAGrad's optimum by exact small QPs (quadprog, float64), independent of the method's dual:
    (v*, d*) with v* = max over the ball ‖d − g0‖ ≤ c‖g0‖ of min_i g_iᵀd and d* the optimal d
    nearest g0. For a level t, the nearest point of {d : g_iᵀd ≥ t ∀i} to g0 is a QP; its distance
    grows with t, so v* is the largest t at which it is within the ball (bisection, 80 halvings)
    and d* that QP's solution at v*. (For v* > 0 the ball touches the set {Gd ≥ v*} at one point,
    CAGrad's unique solution; for v* = 0, where no d improves every task, every d of the ball with
    Gd ≥ 0 is optimal and CAGrad picks the one nearest the mean gradient.)"""
    quadprog = pytest.importorskip("quadprog")
    a, g0 = g.numpy(), g.mean(0).numpy()
    radius = c * float(np.linalg.norm(g0))

    def nearest(t: float) -> np.ndarray | None:
        try:
            return quadprog.solve_qp(np.eye(a.shape[1]), g0, a.T, np.full(a.shape[0], t))[0]
        except ValueError:  # no d with every g_iᵀd ≥ t
            return None

    lo = float((a @ g0).min())  # d = g0 attains it
    hi = float((a @ g0 + radius * np.linalg.norm(a, axis=1)).min())  # each g_iᵀd is at most this in the ball
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        x = nearest(mid)
        if x is not None and np.linalg.norm(x - g0) <= radius:
            lo = mid
        else:
            hi = mid
    return lo, nearest(lo)


def _cagrad_cases(n: int, seed: int):
    """Random K×P matrices, K = 2–5, P = 2–5 (so the origin is often in the hull), row norms spread
    e^(±2·N(0,1)); every third one with a zero row, every fifth with a row a negative multiple of
    another (anti-parallel)."""
    gen = torch.Generator().manual_seed(seed)
    for case in range(n):
        k, p = (int(torch.randint(2, 6, (1,), generator=gen)) for _ in range(2))
        g = torch.randn(k, p, generator=gen, dtype=torch.float64) * torch.exp(
            2 * torch.randn(k, 1, generator=gen, dtype=torch.float64)
        )
        if case % 3 == 0:
            g[int(torch.randint(0, k, (1,), generator=gen))] = 0.0
        if case % 5 == 0:
            g[1] = -float(torch.rand(1, generator=gen, dtype=torch.float64) + 0.1) * g[0]
        yield g


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8, 1.5])
def test_cagrad_matches_an_exact_qp_oracle(c):
    """Against ``cagrad_oracle`` on 50 random cases per c: the update stays in the ball, its
    worst-task improvement is v* and it is the optimal d nearest g0. Tolerances: the scale of
    g_iᵀd is S = max‖g_i‖·(‖g0‖ + radius); the method's round-off (face solves of condition up to
    ~1e6 here, so ~1e-10 relative) and the bisection's end (2^-80 of the bracket) are below 1e-9·S
    for v*; d* moves with the level t at a rate of up to 1/σ_min of the active gradients, so d is
    compared at 1e-9 of the ball's scale ‖g0‖ + radius (measured: at most 1.1e-12). Before the fix: with a zero task gradient and c < 1
    the mean gradient was returned (worst-task improvement below v* = 0 whenever a task conflicts
    with the mean), and for c ≥ 1 a zero update (optimal, but not the optimum nearest g0)."""
    for g in _cagrad_cases(50, seed=int(c * 10)):
        d = get_method("cagrad", c=c)(g).numpy()
        v_star, d_star = cagrad_oracle(g, c)
        g0 = g.mean(0).numpy()
        radius = c * float(np.linalg.norm(g0))
        size = float(np.linalg.norm(g0)) + radius
        scale = float(g.norm(dim=1).max()) * size
        assert np.linalg.norm(d - g0) <= radius * (1 + 1e-9) + 1e-12 * size
        assert float((g.numpy() @ d).min()) >= v_star - 1e-9 * scale, (g, v_star)
        assert np.linalg.norm(d - d_star) <= 1e-9 * size, (g, d, d_star)


def test_cagrad_zero_task_gradient_keeps_the_others_from_conflicting():
    """Regression (issue #20): with g_3 = 0 no d improves every task, so the best worst-task
    improvement is 0; d = (0, 1/3) attains it inside the ball, while the mean gradient
    (−1/15, 1/3), returned before, makes task 1 worse (g_1ᵀd = −1/15)."""
    g = torch.tensor([[1.0, 0.0], [-1.2, 1.0], [0.0, 0.0]], dtype=torch.float64)
    d = get_method("cagrad", c=0.4)(g)
    assert torch.allclose(d, torch.tensor([0.0, 1.0 / 3.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_cagrad_degenerate_hull_around_the_origin():
    """Regression: K > P, one tiny gradient, the origin inside the hull. The optimum of the inner
    problem is at a point where ‖g_w‖ is small and the old projected-gradient solver stalled far
    from it (worst-task improvement off by 20%, and different for a permutation of the tasks)."""
    g = torch.tensor(
        [[1.4872, -1.7638], [-1.4234, 2.6821], [0.4387, -0.8373], [0.1089, 0.5471], [-0.0189, -0.0331]],
        dtype=torch.float64,
    )
    d = get_method("cagrad", c=0.4)(g)
    grid = _best_worst_task_improvement_on_a_grid(g, 0.4)
    assert float((g @ d).min()) >= float(grid.max()) - 1e-12
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert torch.allclose(get_method("cagrad", c=0.4)(g[perm]), d, rtol=1e-9, atol=1e-12)


def test_cagrad_origin_in_the_hull():
    """Two pairs of opposite gradients: the origin is in the hull (no d improves every task beyond
    0 along both axes) yet some d still beats the mean; and with exactly opposite pairs of equal
    norms the mean gradient is 0, the ball is a point, and the update must be 0."""
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    m = get_method("cagrad", c=0.4)
    d = m(g)
    grid = _best_worst_task_improvement_on_a_grid(g, 0.4)
    assert float((g @ d).min()) >= float(grid.max()) - 1e-12
    assert float((g @ d).min()) > float((g @ g.mean(0)).min())  # strictly better than the mean
    g[2, 1] = 1.0
    assert torch.equal(m(g), torch.zeros(2, dtype=torch.float64))


# ---- GDOD ---------------------------------------------------------------------------------


@SETTINGS
@given(matrices(kmin=1, kmax=6), st.lists(st.floats(0.0, 3.0), min_size=6, max_size=6))
def test_gdod_never_conflicts_with_a_task(g, w):
    k = g.shape[0]
    d = get_method("gdod", weights=w[:k])(g)
    scale = float(g.norm()) ** 2
    assert (g @ d >= -1e-9 * scale).all()


@SETTINGS
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=5), st.lists(st.floats(0.1, 3.0), min_size=5, max_size=5))
def test_gdod_aligned_gradients_give_the_weighted_sum(sizes, w):
    """Aligned = positive multiples of one direction (rank 1, the one direction is shared)."""
    k = len(sizes)
    v = torch.randn(7, dtype=torch.float64)
    g = torch.tensor(sizes, dtype=torch.float64)[:, None] * v
    m = get_method("gdod", weights=w[:k])
    d = m(g)
    assert m.stats["conflict_directions"] == 0 and m.stats["rank"] == 1
    ref = torch.tensor(w[:k], dtype=torch.float64) @ g
    assert torch.allclose(d, ref, rtol=1e-9, atol=1e-10 * float(ref.norm()))


def test_gdod_orthogonal_gradients_give_the_weighted_sum():
    """Orthogonal gradients: each direction carries one task only, so none conflicts."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    g = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)[:, None] * q[:3]
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    m = get_method("gdod", weights=w.tolist())
    assert torch.allclose(m(g), w @ g, atol=1e-12)
    assert m.stats["conflict_directions"] == 0


def test_gdod_small_orthogonal_task_is_kept():
    """Regression (issue #20): g_2 orthogonal to g_1 and 1e5 times smaller. Every direction is
    shared, so the update is Σg for β = 0 and β = 1; the old cut, λ_k > 1e-8·λ_max, dropped g_2."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1e-5]], dtype=torch.float64)
    for beta in (0.0, 1.0):
        m = get_method("gdod", beta=beta)
        assert torch.equal(m(g), g.sum(0)) and m.stats["rank"] == 2


def _graded_rows(gen: torch.Generator, k: int, p: int, orthogonal: bool) -> torch.Tensor:
    """k rows in R^p with norms 10^U(−8, 8): orthonormal (QR) or random unit directions."""
    u = torch.randn(p, k, generator=gen, dtype=torch.float64)
    u = torch.linalg.qr(u).Q.T if orthogonal else (u / u.norm(dim=0)).T
    return u * 10.0 ** (16 * torch.rand(k, 1, generator=gen, dtype=torch.float64) - 8)


def test_gdod_orthogonal_gradients_whatever_their_scales():
    """100 sets of mutually orthogonal gradients, K = 2–6, norms over 1e-8…1e8, weights in [0, 3):
    every direction is kept and shared, and d = Σ w_i g_i. Checked on the weights d = Σ α_i g_i
    (``stats["weights"]``): α = w to 1e-12·max(w) (measured 8e-16), so a dropped or misweighted
    small task fails (on d itself, the float64 round-off of the largest term would swamp a task
    1e16 times smaller).
    The Gram matrix of orthonormal float64 rows is diagonal up to ~√P·eps relative, which the
    decomposition (closed form or Jacobi, both relatively accurate) carries into α; d against
    Σ w_i g_i is checked at the round-off of the sum."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(100):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        g = _graded_rows(gen, k, k + int(torch.randint(0, 6, (1,), generator=gen)), orthogonal=True)
        w = (3 * torch.rand(k, generator=gen, dtype=torch.float64)).tolist()
        m = get_method("gdod", weights=w)
        d = m(g)
        assert np.allclose(m.stats["weights"], w, rtol=0, atol=1e-12 * max(w)), (g.norm(dim=1), m.stats)
        ref = torch.tensor(w, dtype=torch.float64) @ g
        assert float((d - ref).abs().max()) <= 1e-14 * float(
            (torch.tensor(w, dtype=torch.float64)[:, None] * g).abs().max()
        )
        assert m.stats["rank"] == k and m.stats["conflict_directions"] == 0


def test_gdod_drops_a_direction_only_for_dependent_gradients():
    """100 random full-rank sets with norms over 1e-8…1e8 (K = 2–6, P = K+2…K+8) keep every
    direction; with one row replaced by a combination of the others (rounded in float64) exactly
    one direction goes. The test is scale-free, λ_k against Σ_i V_ik²‖g_i‖²: the old cut
    (λ_k > 1e-8·λ_max) dropped every task more than 1e4 times smaller than the largest."""
    gen = torch.Generator().manual_seed(12)
    for _ in range(100):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        g = _graded_rows(gen, k, k + int(torch.randint(2, 9, (1,), generator=gen)), orthogonal=False)
        m = get_method("gdod")
        m(g)
        assert m.stats["rank"] == k, g.norm(dim=1)
        coef = torch.randn(k - 1, generator=gen, dtype=torch.float64) / g[:-1].norm(dim=1)  # every term of norm ~1
        g[-1] = coef @ g[:-1]
        m(g)
        assert m.stats["rank"] == k - 1, g.norm(dim=1)


def test_gdod_no_task_worse_to_first_order_whatever_the_norms():
    """β = 0, w ≥ 0: dᵀg_i ≥ 0 for every task, in scale-free terms: ≥ −1e-9·‖d‖‖g_i‖ over 150 random
    sets with norms over 1e-8…1e8 (the coordinates counted as zero, |c_ik| ≤ 1e-12‖g_i‖, can cost at
    most K·1e-12 of that). A zero threshold relative to the largest σ (as before) let a small
    task's conflicting coordinates count as zero, and the update made that task worse."""
    gen = torch.Generator().manual_seed(13)
    for _ in range(150):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        g = _graded_rows(gen, k, int(torch.randint(2, k + 4, (1,), generator=gen)), orthogonal=False)
        d = get_method("gdod")(g)
        assert ((g @ d) >= -1e-9 * float(d.norm()) * g.norm(dim=1)).all(), (g.norm(dim=1), g @ d)


def test_gdod_drops_exactly_the_conflicting_direction():
    g = torch.tensor([[2.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    m = get_method("gdod")
    assert torch.allclose(m(g), torch.tensor([4.0, 0.0], dtype=torch.float64))
    assert m.stats["shared_directions"] == 1 and m.stats["conflict_directions"] == 1
    # beta = 1 keeps every direction: the plain weighted sum
    assert torch.allclose(get_method("gdod", beta=1.0)(g), g.sum(0))


def svd_gdod(g: torch.Tensor, w: list[float], beta: float = 0.0, eps: float = 1e-8) -> torch.Tensor:
    """GDOD from the SVD of G itself (no Gram matrix, no eigh): G = U S Vᵀ, the rows of Vᵀ are the
    orthonormal directions u_k and c_ik = U_ik S_k task i's coordinates on them. A direction is
    kept when S_k² > eps·Σ_i U_ik²‖g_i‖²; a coordinate counts as zero when |c_ik| ≤ 1e-12‖g_i‖."""
    u, s, vt = np.linalg.svd(g.numpy(), full_matrices=False)
    sq = (g.numpy() ** 2).sum(axis=1)
    d = np.zeros(g.shape[1])
    for k in range(s.size):
        if s[k] ** 2 <= eps * float(u[:, k] ** 2 @ sq):
            continue
        c = u[:, k] * s[k]
        tiny = 1e-12 * np.sqrt(sq)
        shared = not ((c > tiny).any() and (c < -tiny).any())
        d += (1.0 if shared else beta) * float(np.dot(w, c)) * vt[k]
    return torch.from_numpy(d)


@SETTINGS
@given(
    matrices(kmin=2, kmax=5, pmax=9),
    st.lists(st.floats(0.0, 3.0), min_size=5, max_size=5),
    st.sampled_from([0.0, 0.5]),
    st.sampled_from([None, 1e-3, -1e-3, 1.0, -1.0]),
)
def test_gdod_matches_an_svd_of_the_gradients(g, w, beta, parallel):
    """K = 2 takes a closed-form 2×2 eigendecomposition, K > 2 LAPACK's: both against an SVD of G.
    ``parallel``: the second row made (anti)parallel to the first, up to that much of a random row."""
    if parallel is not None:
        g[1] = math.copysign(1.0, parallel) * 3.0 * g[0] + abs(parallel) * torch.randn_like(g[0])
    k = g.shape[0]
    w = w[:k]
    d = get_method("gdod", weights=w, beta=beta)(g)
    ref = svd_gdod(g, w, beta)
    assert torch.allclose(d, ref, rtol=1e-9, atol=1e-9 * float(g.norm()) * max(w + [1.0]))


@pytest.mark.parametrize(
    "a,b,c",
    [
        (1.0, 1e-9, 1e-3),
        (1e-3, -1e-9, 1.0),
        (4.0, 2.0, 1.0),
        (1.0, -1.0, 1.0),
        (2.0, 0.0, 1.0),
        (1.0, 0.0, 2.0),
        (3.0, 1e-300, 3.0),
        (1e-20, 1e-10, 1.0),
    ],
)
def test_gdod_closed_form_2x2_eigendecomposition(a, b, c):
    """Residual ‖Mv − λv‖ and orthonormality at float64 resolution, eigenvalues as LAPACK's; a
    diagonal matrix keeps the coordinate axes. The small-b cases are where the eigenvector of the
    larger eigenvalue loses its small component to cancellation if taken from the wrong row."""
    from cogradctl.methods.linalg import eigh2

    lam, vec = eigh2(a, b, c)
    m = np.array([[a, b], [b, c]])
    v = np.array(vec).T  # columns
    scale = max(abs(a), abs(c), abs(b))
    assert np.allclose(lam, np.linalg.eigvalsh(m), rtol=0, atol=1e-15 * scale)
    assert np.abs(m @ v - v * np.array(lam)).max() <= 2e-16 * scale
    assert np.allclose(v.T @ v, np.eye(2), rtol=0, atol=1e-15)
    if b == 0.0:
        assert sorted(map(tuple, np.abs(v))) == [(0.0, 1.0), (1.0, 0.0)]


def test_gdod_no_shared_direction_is_a_reported_zero_update():
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    m = get_method("gdod")
    assert torch.count_nonzero(m(g)) == 0
    assert m.stats["no_shared_direction"] is True


@SETTINGS
@given(matrices(kmin=2, kmax=5))
def test_permutation_equivariance(g):
    perm = torch.randperm(g.shape[0])
    for name in ["mgda", "imtl-g", "gdod", "aligned-mtl", "cagrad", "nash-mtl"]:
        a = get_method(name)(g)
        b = get_method(name)(g[perm])
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(g.norm())), name


# ---- Nash-MTL / Aligned-MTL / MetaBalance -------------------------------------------------------


@SETTINGS
@given(matrices(kmin=2, kmax=5, pmax=8))
def test_nash_mtl_bargaining_condition(g):
    g = torch.cat([g, torch.randn(g.shape[0], g.shape[0], dtype=torch.float64)], dim=1)  # full row rank
    m = get_method("nash-mtl", max_norm=0.0)
    d = m(g)
    alpha = torch.tensor(m.stats["weights"], dtype=torch.float64)
    assert torch.allclose((g @ d) * alpha, torch.ones_like(alpha), rtol=1e-5)


def nash_condition_error(g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per task, |(Mα)_i α_i − 1| (M = G Gᵀ in float64, independent of the method's Gram) divided by
    what the method may leave: its tolerance 1e-10, its ridge 1e-10·β_i² (β_i = α_i‖g_i‖: the ridge
    on the unit-diagonal matrix moves (Mα)_i α_i by exactly that), and the round-off of evaluating
    (Mα)_i α_i, 8·K·eps·Σ_j |M_ij| α_j α_i. Below 1 means the Nash condition holds as promised."""
    m = g @ g.T
    beta = alpha * m.diagonal().sqrt()
    err = ((m @ alpha) * alpha - 1).abs()
    allowed = 1e-10 + 1e-10 * beta**2 + 8 * g.shape[0] * 2.0**-52 * (m.abs() @ alpha) * alpha
    return err / allowed


def test_nash_mtl_warm_start_far_from_the_solution():
    """Regression (issue #20): a step whose solution is far from the previous step's α. The warm
    start used to run Newton into max_iter (500 iterations, residual 5e5) and return those weights;
    the update was 711 times the converged one. It must equal a fresh instance's (cold start) to
    round-off, and so must the clipped (default max_norm) update."""
    g = torch.randn(3, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for max_norm in (0.0, 1.0):
        m = get_method("nash-mtl", max_norm=max_norm)
        m(g)
        d = m(1000 * g)
        assert m.stats["converged"] and m.stats["iterations"] <= 20
        fresh = get_method("nash-mtl", max_norm=max_norm)(1000 * g)
        assert torch.allclose(d, fresh, rtol=1e-9, atol=0)
        assert float(nash_condition_error(1000 * g, torch.tensor(m.stats["weights"], dtype=torch.float64)).max()) < 1


def test_nash_mtl_sequences_with_changing_scales_satisfy_the_nash_condition():
    """60 sequences of 4 steps (K = 2–6): the gradients drift and every task's scale jumps by
    e^(3·N(0,1)) at every step, the whole matrix by 10^-3…10^3: the warm start is often far off.
    After every step, α must satisfy (Mα)_i = 1/α_i within ``nash_condition_error``'s allowance.
    Before the fix, 53 of these 60 sequences had a step stopped at max_iter with such an error."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        k = int(torch.randint(2, 7, (1,), generator=gen))
        p = int(torch.randint(k + 2, 30, (1,), generator=gen))
        base = torch.randn(k, p, generator=gen, dtype=torch.float64)
        m = get_method("nash-mtl", max_norm=0.0)
        for _step in range(4):
            scales = torch.exp(3 * torch.randn(k, 1, generator=gen, dtype=torch.float64))
            drift = torch.rand(1, generator=gen, dtype=torch.float64) * torch.randn(
                k, p, generator=gen, dtype=torch.float64
            )
            g = (base + drift) * scales * 10.0 ** float(torch.randint(-3, 4, (1,), generator=gen))
            m(g)
            alpha = torch.tensor(m.stats["weights"], dtype=torch.float64)
            assert m.stats["converged"], m.stats
            assert float(nash_condition_error(g, alpha).max()) < 1, (k, p, m.stats)


def test_nash_mtl_round_off_cannot_make_the_problem_unbounded():
    """Two anti-parallel float32 gradients (one column): the float32 Gram matrix can give a cosine
    just below −1, an indefinite matrix that a 1e-10 ridge does not cover, and f unbounded below
    (the first version of the warm-start fix then took the square root of a negative number).
    The ridge grows by twice the negative eigenvalue: finite weights that solve the regularised
    problem to its tolerance. (Before the ridge fix, 102 of 200 such pairs failed.)"""
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        g = torch.randn(2, 1, generator=gen)
        g[1] = -g[1].abs() * torch.sign(g[0])
        m = get_method("nash-mtl", max_norm=0.0)
        d = m(g)
        assert torch.isfinite(d).all() and m.stats["converged"], (g, m.stats)


def test_aligned_mtl_makes_components_equal_and_orthogonal():
    g = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    m = get_method("aligned-mtl", weights=[1.0, 0.0])
    d0 = m(g)
    d1 = get_method("aligned-mtl", weights=[0.0, 1.0])(g)
    assert abs(float(d0 @ d1)) < 1e-9
    assert abs(float(d0.norm() - d1.norm())) < 1e-9


def test_metabalance_relax_one_matches_the_target_norm():
    g = torch.tensor([[1.0, 0.0], [0.0, 5.0], [0.0, 0.1]])
    m = get_method("metabalance", relax=1.0)
    d = m(g)
    assert torch.allclose(d, torch.tensor([1.0, 2.0]))
    assert get_method("metabalance", relax=0.0)(g).allclose(g.sum(0))
