"""Cross-checks against torchjd 0.18's independent aggregators (skipped without torchjd).

Relations tested (docs/methods.md, "Differences from torchjd"):
- PCGrad, GradVac: identical given the same random orders (both draw with ``torch.randperm`` in
  the same pattern; here both read one scripted sequence of permutations).
- MGDA: ours is the exact min-norm point; torchjd's Frank-Wolfe stops early, so ours has a norm
  no larger than torchjd's and matches it to 1e-3 (to 1e-9 for K = 2).
- IMTL-G: identical for linearly independent gradients (M⁻¹n, Σα = 1). For dependent ones we take
  the pseudo-inverse of the cosine matrix (norm-free), torchjd of the Gram matrix: ours then has
  the direction of torchjd's IMTL-G applied to the unit gradients g_i/‖g_i‖.
- CAGrad: identical definition (mean scale, no 1/(1+c²) rescale) up to both solvers' tolerance.
- Aligned-MTL: torchjd's default preference is the mean (1/K), ours the sum: ours = K · torchjd,
  and equal for the same explicit weights.
- Nash-MTL: same equation (Mα)_i = 1/α_i and same max-norm clipping; torchjd's CCP solver stops
  at a residual of 1e-3, so they agree to 1e-4 relative (and ours satisfies it to 1e-10).
"""

from __future__ import annotations

import warnings

import pytest
import torch

tja = pytest.importorskip("torchjd.aggregation")

from cogradctl.methods import get_method  # noqa: E402

SHAPES = [(2, 10), (3, 10), (5, 20), (8, 30)]


def matrix(k, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, p, generator=gen, dtype=torch.float64)


REAL_RANDPERM = torch.randperm


class ScriptedRandperm:
    """A stand-in for torch.randperm returning a fixed sequence of permutations, for both sides."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n, *args, **kwargs):
        return REAL_RANDPERM(n, generator=self.gen)


@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pcgrad_matches_given_the_same_orders(monkeypatch, k, p, seed):
    g = matrix(k, p, seed)
    monkeypatch.setattr(torch, "randperm", ScriptedRandperm(seed))
    ours = get_method("pcgrad")(g)
    monkeypatch.setattr(torch, "randperm", ScriptedRandperm(seed))
    theirs = tja.PCGrad()(g)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,p", SHAPES)
def test_gradvac_matches_over_several_steps(monkeypatch, k, p):
    ours_m, theirs_m = get_method("gradvac", beta=0.3), tja.GradVac(beta=0.3)
    for step in range(4):
        g = matrix(k, p, 10 + step)
        monkeypatch.setattr(torch, "randperm", ScriptedRandperm(step))
        ours = ours_m(g)
        monkeypatch.setattr(torch, "randperm", ScriptedRandperm(step))
        theirs = theirs_m(g)
        assert torch.allclose(ours, theirs, rtol=1e-8, atol=1e-10), step


@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_is_at_least_as_close_to_the_min_norm_point(k, p, seed):
    g = matrix(k, p, seed)
    ours = get_method("mgda")(g)
    theirs = tja.MGDA(epsilon=1e-12, max_iters=10000)(g)
    assert float(ours.norm()) <= float(theirs.norm()) + 1e-12
    tol = 1e-9 if k == 2 else 1e-3
    assert torch.allclose(ours, theirs, atol=tol * float(g.norm()))


@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtlg_matches(k, p, seed):
    g = matrix(k, p, seed)
    m = get_method("imtl-g")
    ours = m(g)
    if m.stats["fallback_l1"]:
        pytest.skip("Σα ≤ 0: our documented fallback differs (torchjd flips the direction)")
    assert torch.allclose(ours, tja.IMTLG()(g), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_imtlg_dependent_gradients_follow_torchjd_on_the_unit_gradients(seed):
    """K = 4 > P = 3: the gradients are dependent and the pseudo-inverse decides. Ours is
    D⁻¹C⁺1 (C the cosine matrix), torchjd's IMTL-G on the unit gradients U gives Uᵀ C⁺1 / Σ C⁺1:
    the same direction, with a positive factor when both sums are positive."""
    g = matrix(4, 3, seed)
    ours = get_method("imtl-g")(g)
    theirs = tja.IMTLG()(g / g.norm(dim=1, keepdim=True))
    cos = float(ours @ theirs) / float(ours.norm() * theirs.norm())
    assert cos > 1 - 1e-12


@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("c", [0.2, 0.5, 1.0])
def test_cagrad_matches(k, p, c):
    pytest.importorskip("cvxpy")
    g = matrix(k, p, 7)
    ours = get_method("cagrad", c=c)(g)
    theirs = tja.CAGrad(c=c, norm_eps=1e-12)(g)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.norm()))


@pytest.mark.parametrize("k,p", SHAPES + [(4, 3)])
@pytest.mark.parametrize("scale", ["min", "median"])
def test_aligned_mtl_is_k_times_torchjd_mean(k, p, scale):
    g = matrix(k, p, 3)
    ours = get_method("aligned-mtl", scale=scale)(g)
    theirs = tja.AlignedMTL(scale_mode=scale)(g)
    assert torch.allclose(ours, k * theirs, rtol=1e-9, atol=1e-11)
    w = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    ours_w = get_method("aligned-mtl", weights=w.tolist(), scale=scale)(g)
    theirs_w = tja.AlignedMTL(pref_vector=w.float().double(), scale_mode=scale)(g)
    assert torch.allclose(ours_w, theirs_w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nash_mtl_matches(k, p, max_norm):
    pytest.importorskip("cvxpy")
    ours_m = get_method("nash-mtl", max_norm=max_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_m = tja.NashMTL(n_tasks=k, max_norm=max_norm)
        for step in range(2):  # warm starts on both sides
            g = matrix(k, p, 20 + step)
            ours, theirs = ours_m(g), theirs_m(g)
            assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.norm())), step
