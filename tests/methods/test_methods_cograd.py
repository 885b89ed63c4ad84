"""CoGrad (docs/methods.md §2): the four Hessian approximations and the transference oracle."""

from __future__ import annotations

import warnings

import pytest
import torch

from cogradctl.methods import get_method

F64 = torch.float64


class Tiny(torch.nn.Module):
    """Shared trunk + 3 task heads, float64, smooth (tanh) so Hessians are non-trivial."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(4, 5, generator=gen, dtype=F64) * 0.7)
        self.b1 = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=F64) * 0.1)
        self.heads = [torch.randn(5, generator=gen, dtype=F64) for _ in range(3)]
        self.x = torch.randn(16, 4, generator=gen, dtype=F64)
        self.y = [torch.randn(16, generator=gen, dtype=F64) for _ in range(3)]

    def shared(self):
        return [self.w1, self.b1]

    def losses_at(self, flat):
        w1 = flat[:20].reshape(4, 5)
        b1 = flat[20:25]
        h = torch.tanh(self.x @ w1 + b1)
        return torch.stack([((h @ head - y) ** 2).mean() for head, y in zip(self.heads, self.y)])


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.shared()]).requires_grad_(True)


def task_grads(model, theta, create_graph=False):
    losses = model.losses_at(theta)
    rows = [torch.autograd.grad(l, theta, create_graph=create_graph, retain_graph=True)[0] for l in losses]
    return torch.stack(rows), losses


def make_hvp(model, theta):
    grads, _ = task_grads(model, theta, create_graph=True)

    def hvp(i, v):
        return torch.autograd.grad(grads[i], theta, grad_outputs=v, retain_graph=True)[0]

    return hvp


def transference_grad(model, theta, alpha):
    """Exact ∇_θ Σ_{i≠j} Z_{i→j}: differentiate through the lookahead θ' = θ − α g_i(θ)."""
    grads, losses = task_grads(model, theta, create_graph=True)
    total = 0.0
    k = len(losses)
    for i in range(k):
        after = model.losses_at(theta - alpha * grads[i])
        for j in range(k):
            if i != j:
                total = total + losses[j] - after[j]
    return torch.autograd.grad(total, theta)[0]


def hvp_form(model, theta, alpha):
    """α Σ_{i≠j} (H_i g_j + H_j g_i) by direct double backward."""
    grads, _ = task_grads(model, theta)
    hvp = make_hvp(model, theta)
    k = grads.shape[0]
    return alpha * sum(hvp(i, grads[j]) + hvp(j, grads[i]) for i in range(k) for j in range(k) if i != j)


def test_diag_by_hand():
    g = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 1.0], [0.5, 0.5, 2.0]])
    gamma = 0.3
    expected = torch.zeros(3)
    for i in range(3):
        others = sum(g[j] for j in range(3) if j != i)
        expected += g[i] - gamma * g[i] * g[i] * others
    assert torch.allclose(get_method("cograd", gamma=gamma, normalize=False)(g), expected)
    # curvature-normalised: g_i⊙g_i divided by its mean
    expected_n = sum(g[i] - gamma * (g[i] ** 2 / (g[i] ** 2).mean()) * (g.sum(0) - g[i]) for i in range(3))
    assert torch.allclose(get_method("cograd", gamma=gamma, normalize="curvature")(g), expected_n)
    assert torch.allclose(get_method("cograd", gamma=gamma, normalize=True)(g), expected_n)
    # relative (default): the raw term's direction, rescaled to gamma times the task gradient's norm
    expected_r = torch.zeros(3)
    for i in range(3):
        term = g[i] * g[i] * (g.sum(0) - g[i])
        expected_r += g[i] - gamma * g[i].norm() * term / term.norm()
    m = get_method("cograd", gamma=gamma)
    assert torch.allclose(m(g), expected_r)
    assert m.stats["relative_correction"] == pytest.approx([gamma] * 3, rel=1e-5)


def test_relative_strength_is_invariant_to_gradient_scale():
    g = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    m = get_method("cograd", gamma=0.2)
    for scale in (1e-6, 1.0, 1e6):
        torch.testing.assert_close(m(g * scale) / scale, m(g), rtol=1e-4, atol=1e-6)
        assert m.stats["relative_correction"] == pytest.approx([0.2] * 3, rel=1e-4)


def test_outer_is_gram_times_gradient():
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64)  # float64: the sums below cancel
    m = get_method("cograd", gamma=0.2, hessian="outer", normalize=False)
    m.setup(3)
    corr = m.corrections(g)
    for i in range(3):
        ref = sum((g[i] @ g[j]) * g[i] for j in range(3) if j != i)
        assert torch.allclose(corr[i], 0.2 * ref)
    # curvature-normalised: H̃_i = u_i u_iᵀ, invariant to the scale of g_i's task
    mn = get_method("cograd", gamma=0.2, hessian="outer", normalize="curvature")
    scaled = g.clone()
    scaled[0] *= 1e3
    mn.setup(3)
    assert torch.allclose(mn.corrections(scaled)[0], mn.corrections(g)[0])


def test_exact_matches_the_hvp_form_to_rounding():
    model = Tiny()
    theta = flat_params(model)
    grads, losses = task_grads(model, theta)
    grads = grads.detach()
    alpha = 0.05
    # γ = 2α: Σ_i w_i ĝ_i = Σ g_i − α Σ_{i≠j}(H_i g_j + H_j g_i)
    m = get_method("cograd", gamma=2 * alpha, hessian="exact", normalize=False)
    assert m.requires_hvp
    update = m(grads, losses.detach(), hvp=make_hvp(model, theta))
    ref = grads.sum(0) - hvp_form(model, theta, alpha)
    assert torch.allclose(update, ref, rtol=1e-12, atol=1e-14)


def test_hvp_form_is_the_transference_gradient_to_second_order():
    model = Tiny(seed=1)
    theta = flat_params(model)
    errors = []
    for alpha in [0.02, 0.01, 0.005]:
        exact = transference_grad(model, theta, alpha)
        approx = hvp_form(model, theta, alpha)
        errors.append(float((exact - approx).norm()))
        assert errors[-1] < 0.1 * float(exact.norm())
    for big, small in zip(errors, errors[1:]):
        assert 3.0 < big / small < 5.0  # O(α²): halving α divides the error by ~4


def test_exact_normalisation_uses_the_gain_along_the_own_gradient():
    model = Tiny(seed=2)
    theta = flat_params(model)
    grads, losses = task_grads(model, theta)
    grads = grads.detach()
    hvp = make_hvp(model, theta)
    m = get_method("cograd", gamma=0.1, hessian="exact", normalize="curvature")
    m.setup(3)
    corr = m.corrections(grads, hvp)
    for i in range(3):
        scale = hvp(i, grads[i]).norm() / grads[i].norm()
        ref = 0.1 * hvp(i, grads.sum(0) - grads[i]) / scale
        assert torch.allclose(corr[i], ref, rtol=1e-12)


def test_exact_without_hvp_is_an_error():
    with pytest.raises(ValueError, match="hvp"):
        get_method("cograd", hessian="exact")(torch.randn(2, 3))


def test_fisher_ema_accumulates_and_round_trips():
    m = get_method("cograd", hessian="fisher-ema", fisher_decay=0.5, normalize=False, gamma=1.0)
    g1, g2 = torch.randn(2, 4), torch.randn(2, 4)
    m(g1)
    assert torch.allclose(m.fisher, g1 * g1)
    m(g2)
    assert torch.allclose(m.fisher, 0.5 * g1 * g1 + 0.5 * g2 * g2)
    fresh = get_method("cograd", hessian="fisher-ema", fisher_decay=0.5, normalize=False, gamma=1.0)
    fresh.setup(2)  # P unknown until the first step: load_state_dict takes the saved width
    fresh.load_state_dict(m.state_dict())
    g3 = torch.randn(2, 4)
    assert torch.equal(fresh(g3), m(g3))
    # segments known before setup: the buffer is allocated at full width
    seg = get_method("cograd", hessian="fisher-ema")
    seg.segments = [3, 1]
    seg.setup(2)
    assert seg.fisher.shape == (2, 4)


def test_invisible_correction_warns_once():
    m = get_method("cograd", gamma=1e-9)
    g = torch.randn(2, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(45):
            m(g)
    assert len([w for w in caught if "practically 'ew'" in str(w.message)]) == 1
    assert len(m.stats["relative_correction"]) == 2


def test_weights_and_per_task_gamma():
    """The task weights scale the task gradients, not the corrections (the objective's gradient, see
    the next test): d = Σ_i (w_i g_i − γ_i g_i⊙g_i⊙Σ_{j≠i} g_j) with the diagonal Hessian."""
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    m = get_method("cograd", gamma=[0.3, 0.5], weights=[2.0, 0.5], normalize=False)
    expected = (2.0 * g[0] - 0.3 * g[0] ** 2 * g[1]) + (0.5 * g[1] - 0.5 * g[1] ** 2 * g[0])
    assert torch.allclose(m(g), expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(m.task_weights(), torch.tensor([2.0, 0.5], dtype=torch.float64))


def test_weighted_update_is_the_objective_gradient_to_second_order():
    """With task weights w ≠ 1, ``hessian=exact, normalize=none, gamma=2α`` must be the gradient of
    CoGrad's objective Σ_i w_i L_i − Σ_{i≠j} Z_{i→j} (λ = 1) up to O(α²), against the exact
    gradient through the lookahead (autograd): halving α divides the gap by about 4. Multiplying
    each correction by w_i (as an earlier version did) leaves a first-order gap
    2α Σ_i (w_i − 1) Σ_{j≠i} H_i g_j, which halving α only halves."""
    model = Tiny(seed=3)
    theta = flat_params(model)
    grads, losses = task_grads(model, theta)
    grads, losses = grads.detach(), losses.detach()
    w = torch.tensor([2.0, 0.5, 1.5], dtype=F64)
    gaps = []
    for alpha in [0.01, 0.005]:
        oracle = w @ grads - transference_grad(model, theta, alpha)
        m = get_method("cograd", gamma=2 * alpha, hessian="exact", normalize="none", weights=w.tolist())
        gaps.append(float((m(grads, losses, hvp=make_hvp(model, theta)) - oracle).norm()))
    assert 3.0 < gaps[0] / gaps[1] < 5.0, gaps
