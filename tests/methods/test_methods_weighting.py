"""Loss-weighting methods: weighted, uw, dwa, gradnorm; MGDA's l2 option."""

from __future__ import annotations

import math

import torch

from cogradctl.methods import get_method


def test_weighted_sum_and_task_weights():
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = get_method("weighted", weights=[0.5, 2.0])
    assert torch.allclose(m(g), 0.5 * g[0] + 2.0 * g[1])
    assert torch.equal(m.task_weights(), torch.tensor([0.5, 2.0], dtype=torch.float64))


def test_uw_update_gradient_and_training():
    m = get_method("uw")
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    losses = torch.tensor([4.0, 0.25])
    opt = None
    for _ in range(300):
        m(g, losses)
        if opt is None:
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
        opt.step()
    # optimum of exp(-s) L + s: s = log L
    assert torch.allclose(m.log_vars.detach(), losses.log(), atol=1e-3)
    assert torch.allclose(m.task_weights(), 1 / losses.double(), rtol=1e-3)  # float64, as the weights applied
    u = m(g, losses)
    assert torch.allclose(u, torch.tensor([0.25, 4.0]), rtol=1e-3)


def test_dwa_weights_follow_the_loss_ratios():
    m = get_method("dwa", temperature=2.0)
    g = torch.eye(2)
    m(g, torch.tensor([1.0, 1.0]))
    m(g, torch.tensor([0.5, 1.0]))  # task 0 improved fast, task 1 not
    u = m(g, torch.tensor([0.5, 1.0]))
    r = torch.tensor([0.5, 1.0])
    expected = 2 * torch.softmax(r / 2.0, 0)
    assert torch.allclose(u, expected.float())
    assert u[1] > u[0]  # the slower task gets more weight
    assert abs(float(u.sum()) - 2.0) < 1e-6


def test_dwa_period_averages_losses():
    m = get_method("dwa", period=2)
    g = torch.eye(2)
    for loss in [[1.0, 1.0], [1.0, 1.0], [0.5, 1.0], [0.5, 1.0]]:
        m(g, torch.tensor(loss))
    assert torch.allclose(m(g, torch.tensor([1.0, 1.0])), (2 * torch.softmax(torch.tensor([0.25, 0.5]), 0)))


def test_gradnorm_equalises_weighted_norms():
    m = get_method("gradnorm", alpha=0.0)  # alpha = 0: pull towards equal weighted norms
    g = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    losses = torch.tensor([1.0, 1.0])
    opt = None
    for _ in range(400):
        m(g, losses)
        if opt is None:
            opt = torch.optim.SGD(m.parameters(), lr=0.002)
        opt.step()
    m(g, losses)
    w = torch.tensor(m.stats["weights"])
    n = w * g.norm(dim=1)
    assert abs(float(n[0] - n[1])) < 0.05 * float(n.mean())
    assert abs(float(w.sum()) - 2.0) < 1e-5


def test_gradnorm_losing_task_gets_a_larger_target():
    m = get_method("gradnorm", alpha=1.5)
    g = torch.eye(2)
    m(g, torch.tensor([1.0, 1.0]))
    m(g, torch.tensor([0.1, 1.0]))  # task 1 trains slower: its target norm is higher
    t = m.stats["target_norms"]
    assert t[1] > t[0]


def test_mgda_l2_normalisation():
    g = torch.tensor([[10.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    d = get_method("mgda", normalize="l2")(g)
    assert torch.allclose(d, torch.tensor([0.5, 0.5], dtype=torch.float64))
    raw = get_method("mgda")(g)
    assert math.isclose(float(raw @ g[0]), float(raw @ g[1]), rel_tol=1e-9)


def test_weighted_and_uw_weight_float64_gradients_exactly():
    """The weights are applied in the gradients' dtype. Oracle: each weight as a Python float
    (uw: math.exp of the parameter's own value), the sum in float64. Each product and the sum of
    two terms round once or twice, so 4 ulps of the largest term bound the difference; a weight
    stored or exponentiated in float32 (0.1 rounds by 1.5e-9 relative, exp(−0.3) by up to 6e-8)
    misses that by seven orders of magnitude."""
    g = torch.randn(2, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = [0.1, 0.7]
    d = get_method("weighted", weights=weights)(g)
    ref = weights[0] * g[0] + weights[1] * g[1]
    assert float((d - ref).abs().max()) <= 4 * 2.0**-52 * float(ref.abs().max())
    m = get_method("uw", init=0.3)
    d = m(g, torch.tensor([1.0, 2.0], dtype=torch.float64))
    w = [math.exp(-float(s)) for s in m.log_vars.detach()]
    ref = w[0] * g[0] + w[1] * g[1]
    assert float((d - ref).abs().max()) <= 4 * 2.0**-52 * float(ref.abs().max())
    assert m.task_weights().tolist() == w
