"""Every method with a task that has no labelled row in a batch (``observed=``, issue #23).

The rule (cogradctl/methods/base.py, docs/methods.md "Tasks without labels in a batch"): an
unobserved task contributes nothing to the step and its per-task state is not moved. The oracles:
the same method built for the K−1 observed tasks alone and given the observed rows (where the
method's definition makes the two agree), hand computations in float64 (where it does not: the
loss-weighting methods keep the K-task scale), the state before the step, and the method called
without the keyword (every task observed: bit for bit).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from cogradctl.methods import list_methods

F64 = torch.float64
K, P, OFF = 4, 9, 2  # four tasks, nine shared parameters, task 2 unobserved
ROWS = [i for i in range(K) if i != OFF]
MASK = torch.tensor([i != OFF for i in range(K)])
SEGMENTS = [4, 5]  # granularity='tensor': two shared tensors

# Per-task options, distinct per task so that a mix-up of indices shows.
WEIGHTS = [1.0, 0.5, 2.0, 1.5]
GAMMA = [0.1, 0.3, 0.2, 0.4]
PER_TASK = {
    "weighted": {"weights": WEIGHTS},
    "aligned-mtl": {"weights": WEIGHTS},
    "gdod": {"weights": WEIGHTS},
    "cograd": {"gamma": GAMMA, "weights": WEIGHTS},
}
COGRAD = [f"cograd:{h}" for h in ("diag", "fisher-ema", "outer", "exact")]
COGRAD += [f"cograd:{h}/{n}" for h in ("diag", "fisher-ema", "exact") for n in ("none", "curvature")]
# The registry's factories, looked up once (``get_method`` reads the entry points on every call).
FACTORIES = {name: entry.factory for name, entry in list_methods().items()}
REGISTERED = sorted(FACTORIES)
VARIANTS = [n for n in REGISTERED if n != "cograd"] + COGRAD
TENSOR = ["mgda", "pcgrad", "gradvac", "cagrad", "imtl-g", "nash-mtl", "aligned-mtl", "metabalance", "gdod"]
# Methods whose update with a task unobserved is the method built for the observed tasks alone.
# Not: ew with reduction=mean and dwa (loss weighting: an observed task keeps its K-task weight,
# tested below by hand).
SAME_AS_SUBSET = [n for n in VARIANTS if n not in ("ew", "dwa")] + ["ew:sum"]
STEPS = 3


def options(name: str, keep: list[int] | None = None) -> dict:
    """The variant's options; per-task lists restricted to the tasks ``keep``."""
    base, _, variant = name.partition(":")
    opts: dict = {}
    if base == "cograd":  # cograd:HESSIAN or cograd:HESSIAN/NORMALIZE
        hessian, _, normalize = variant.partition("/")
        opts = {"hessian": hessian, **({"normalize": normalize} if normalize else {})}
    if base == "nash-mtl":
        opts["max_norm"] = 0.0  # no clipping, so that the weights show in the update
    for key, values in PER_TASK.get(base, {}).items():
        opts[key] = values if keep is None else [values[i] for i in keep]
    return opts


def build(name: str, keep: list[int] | None = None, **extra):
    m = FACTORIES[name.partition(":")[0]](**options(name, keep), **extra)
    if extra.get("granularity") == "tensor":
        m.segments = SEGMENTS
    return m


HESSIANS = None


def hessians() -> torch.Tensor:
    """The Hessians H_i = A_iᵀA_i + I of a small quadratic model (PSD, float64)."""
    global HESSIANS
    if HESSIANS is None:
        gen = torch.Generator().manual_seed(7)
        a = torch.randn(K, P, P, generator=gen, dtype=F64)
        HESSIANS = a.transpose(1, 2) @ a / P + torch.eye(P, dtype=F64)
    return HESSIANS


def hvp_for(tasks: list[int], observed: torch.Tensor | None):
    """hvp(i, v) = H_{tasks[i]} v for the method's task i; an unobserved task's product is refused
    (in the loop its loss has no graph)."""

    def hvp(i, v):
        assert observed is None or bool(observed[i]), "a Hessian product asked for an unobserved task"
        return hessians()[tasks[i]].to(v) @ v

    return hvp


def call(m, grads, losses, tasks: list[int], observed=None):
    kwargs = {"observed": observed} if observed is not None else {}
    if m.requires_hvp:
        kwargs["hvp"] = hvp_for(tasks, observed)
    return m(grads, losses, **kwargs)


def sgd(m, lr: float = 0.1) -> None:
    """A step of the method's learnable parameters, as the loop's optimizer would take (plain SGD)."""
    with torch.no_grad():
        for p in m.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def batches(n: int = STEPS, seed: int = 0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        grads = torch.randn(K, P, generator=gen, dtype=dtype)
        losses = (torch.rand(K, generator=gen, dtype=dtype) + 0.2).to(dtype)
        out.append((grads, losses))
    return out


def unobserved(grads, losses):
    """The batch as the loop gives it when task OFF has no labelled row: zero row, zero loss."""
    grads, losses = grads.clone(), losses.clone()
    grads[OFF] = 0
    losses[OFF] = 0
    return grads, losses


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= rtol * scale


# --- every task observed: nothing changes ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name", VARIANTS + [f"{n}@tensor" for n in TENSOR])
def test_all_observed_is_bit_for_bit_the_call_without_the_keyword(name, dtype):
    name, _, gran = name.partition("@")
    extra = {"granularity": gran} if gran else {}
    plain, none, everyone = build(name, **extra), build(name, **extra), build(name, **extra)
    for grads, losses in batches(4, seed=1, dtype=dtype):
        want = call(plain, grads, losses, list(range(K)))
        got_none = call(none, grads, losses, list(range(K)), observed=None)
        got_all = call(everyone, grads, losses, list(range(K)), observed=torch.ones(K, dtype=torch.bool))
        assert torch.equal(want, got_none) and torch.equal(want, got_all)
        assert plain.stats == none.stats == everyone.stats
        for other in (none, everyone):
            assert plain.state_dict().keys() == other.state_dict().keys()
            for key, value in plain.state_dict().items():
                assert torch.equal(value, other.state_dict()[key]), key
            for p, q in zip(plain.parameters(), other.parameters()):
                assert torch.equal(p.grad, q.grad)
            w, v = plain.task_weights(), other.task_weights()
            assert (w is None and v is None) or torch.equal(w, v)
        for m in (plain, none, everyone):
            sgd(m)


# --- an unobserved task: the method on the observed tasks alone ------------------------------------


@pytest.mark.parametrize("name", SAME_AS_SUBSET + [f"{n}@tensor" for n in TENSOR])
def test_unobserved_task_gives_the_method_on_the_observed_tasks(name):
    name, _, gran = name.partition("@")
    extra = {"granularity": gran} if gran else {}
    if name == "ew:sum":
        name = "ew"
    full, alone = build(name, **extra), build(name, keep=ROWS, **extra)
    for grads, losses in batches(seed=2):
        g, l = unobserved(grads, losses)
        got = call(full, g, l, list(range(K)), observed=MASK)
        want = call(alone, grads[ROWS], losses[ROWS], ROWS)
        assert close(got, want), (name, got, want)
        for key, value in full.stats.items():
            if isinstance(value, list) and len(value) == K:  # per-task stats: the observed tasks'
                assert close(torch.tensor([value[i] for i in ROWS]), torch.tensor(alone.stats[key])), key
        for p, q in zip(full.parameters(), alone.parameters()):  # learnable weights and their gradient
            assert float(p.grad[OFF]) == 0.0
            assert close(p.grad[ROWS], q.grad) and close(p.detach()[ROWS], q.detach())
        sgd(full)
        sgd(alone)
    w = full.task_weights()
    assert w is None or (w.shape == (K,) and torch.isfinite(w).all())


# Methods whose state, if any, is kept per task independently of the other tasks: after steps that
# observed every task, a step with one unobserved is still the method on the others alone (fed the
# observed tasks' rows of every step). (Not: pcgrad and gradvac, whose random order is drawn over
# the tasks at hand; gradnorm and dwa, whose weights couple the tasks; nash-mtl, warm-started.)
AFTER_HISTORY = ["ew", "weighted", "uw", "mgda", "cagrad", "imtl-g", "aligned-mtl", "metabalance", "gdod"]
AFTER_HISTORY += [n for n in COGRAD]


@pytest.mark.parametrize("name", AFTER_HISTORY)
def test_unobserved_after_observed_steps_is_the_method_on_the_others(name):
    full, alone = build(name), build(name, keep=ROWS)
    data = batches(5, seed=12)
    for n, (grads, losses) in enumerate(data):
        off = n in (2, 4)  # every task observed at steps 0, 1 and 3
        g, l = unobserved(grads, losses) if off else (grads, losses)
        got = call(full, g, l, list(range(K)), observed=MASK if off else None)
        want = call(alone, grads[ROWS], losses[ROWS], ROWS)
        if off:
            assert close(got, want), (name, n)
        sgd(full)
        sgd(alone)


# The per-task state tensors of each stateful method.
STATE = {
    "uw": lambda m: [m.log_vars.detach()],
    "dwa": lambda m: [m.history, m.accum],
    "gradnorm": lambda m: [m.weights.detach(), m.initial_losses],
    "gradvac": lambda m: [m.targets, m.targets.transpose(1, 2)],
    "cagrad": lambda m: [m.warm],
    "nash-mtl": lambda m: [m.alpha],
    "metabalance": lambda m: [m.norm_avg],
    "cograd:fisher-ema": lambda m: [m.fisher],
}


def task_slice(t: torch.Tensor, i: int) -> torch.Tensor:
    """Task i's entries of a state tensor: along its last dimension (``history`` 2×K, ``alpha``
    blocks×K, ``targets`` blocks×K×K), except ``fisher`` (K×P), whose first dimension is the task."""
    if t.dim() == 2 and t.shape[0] == K and t.shape[1] != K:
        return t[i].clone()
    return t[..., i].clone()


@pytest.mark.parametrize("gran", ["global", "tensor"])
@pytest.mark.parametrize("name", sorted(STATE))
def test_unobserved_task_state_is_not_moved(name, gran):
    extra = {"granularity": gran} if gran == "tensor" and name.partition(":")[0] in TENSOR else {}
    if gran == "tensor" and not extra:
        pytest.skip("no granularity option")
    m = build(name, **extra)
    data = batches(6, seed=3)
    for grads, losses in data[:2]:  # observed at first, so its state is not the initial one
        call(m, grads, losses, list(range(K)))
        sgd(m)
    before = [task_slice(t, OFF) for t in STATE[name](m)]
    others = [t.clone() for t in STATE[name](m)]
    for grads, losses in data[2:]:
        g, l = unobserved(grads, losses)
        call(m, g, l, list(range(K)), observed=MASK)
        for p in m.parameters():
            assert float(p.grad[OFF]) == 0.0
        sgd(m)
    after = STATE[name](m)
    for b, a in zip(before, after):
        assert torch.equal(b, task_slice(a, OFF)), name
    assert any(not torch.equal(o, a) for o, a in zip(others, after)), "the observed tasks' state moved"


def test_an_unobserved_task_is_not_read_even_if_its_row_is_not_zero():
    """The contract says the row is zero; what it holds (and its loss) must not change the step."""
    for name in VARIANTS:
        grads, losses = batches(1, seed=4)[0]
        g, l = unobserved(grads, losses)
        noisy = losses.clone()
        noisy[OFF] = 7.0
        a, b = build(name), build(name)
        ua = call(a, g, l, list(range(K)), observed=MASK)
        ub = call(b, grads, noisy, list(range(K)), observed=MASK)
        assert close(ua, ub, 1e-12), name
        for key, value in a.state_dict().items():
            torch.testing.assert_close(value, b.state_dict()[key], rtol=1e-12, atol=0.0, msg=f"{name} {key}")
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p.grad, q.grad), name


# --- the loss-weighting methods keep the K-task scale: by hand -------------------------------------


def test_ew_mean_divides_by_every_task():
    grads, losses = batches(1, seed=5)[0]
    g, l = unobserved(grads, losses)
    m = FACTORIES["ew"](reduction="mean")
    assert close(m(g, l, observed=MASK), grads[ROWS].sum(0) / K, 1e-15)
    assert torch.equal(m.task_weights(), torch.full((K,), 1.0 / K))


def _dwa_oracle(steps: list[tuple[list[float], list[bool]]], period: int, temperature: float = 2.0):
    """The weights DWA should use at each step, in Python floats: each task's period means over the
    steps that observed it; a period that observed it not at all leaves its history as it was."""
    import math

    history = [[0.0, 0.0] for _ in range(K)]  # per task: [period before last, last period]
    sums, seen = [0.0] * K, [0] * K
    done, out = 0, []
    for n, (losses, observed) in enumerate(steps, start=1):
        if done >= 2:
            ratio = [h[1] / h[0] if h[0] > 0 else 1.0 for h in history]
            e = [math.exp(r / temperature) for r in ratio]
            out.append([K * x / sum(e) for x in e])
        else:
            out.append([1.0] * K)
        for i in range(K):
            if observed[i]:
                sums[i] += losses[i]
                seen[i] += 1
        if n % period == 0:
            for i in range(K):
                if seen[i]:
                    history[i] = [history[i][1], sums[i] / seen[i]]
            sums, seen, done = [0.0] * K, [0] * K, done + 1
    return out, history


@pytest.mark.parametrize("period", [1, 2, 3])
def test_dwa_keeps_an_unobserved_task_history_and_the_k_task_weights(period):
    gen = torch.Generator().manual_seed(6)
    plan = [True, True, False, False, True, False, True, True, False, True]  # is task OFF observed
    steps = []
    for on in plan:
        losses = (torch.rand(K, generator=gen, dtype=F64) + 0.2).tolist()
        steps.append((losses, [on or i != OFF for i in range(K)]))
    weights, history = _dwa_oracle(steps, period)
    m = FACTORIES["dwa"](period=period)
    for (losses, observed), want in zip(steps, weights):
        grads = torch.randn(K, P, generator=gen, dtype=F64)
        l = torch.tensor(losses, dtype=F64)
        mask = torch.tensor(observed)
        if not all(observed):
            grads[OFF], l[OFF] = 0, 0
        update = m(grads, l, observed=None if all(observed) else mask)
        w = torch.tensor(want, dtype=F64)
        assert close(m.weights, w, 1e-12)
        assert close(update, (w * mask) @ grads, 1e-12)
    assert close(m.history.T, torch.tensor(history, dtype=F64), 1e-12)


def test_gradnorm_first_loss_of_a_task_unobserved_at_the_start_is_its_first_observed_loss():
    data = batches(3, seed=8)
    m = FACTORIES["gradnorm"]()
    g, l = unobserved(*data[0])
    m(g, l, observed=MASK)
    assert torch.isneginf(m.initial_losses[OFF]) and torch.equal(m.initial_losses[ROWS], l[ROWS])
    sgd(m)
    grads, losses = data[1]
    m(grads, losses)
    assert float(m.initial_losses[OFF]) == float(losses[OFF])  # now its L(0)
    assert torch.equal(m.initial_losses[ROWS], l[ROWS])
    assert abs(float(m.weights.detach().sum()) - K) < 1e-5


def test_metabalance_with_the_target_task_unobserved():
    data = batches(3, seed=9)
    m = FACTORIES["metabalance"](main_task=OFF, relax=0.7, beta=0.9)
    g, l = unobserved(*data[0])  # the target never seen yet: the auxiliary tasks are left unscaled
    assert close(m(g, l, observed=MASK), g[ROWS].sum(0), 1e-15)
    assert float(m.norm_avg[0, OFF]) == 0.0
    grads, losses = data[1]
    m(grads, losses)  # every task: the target's average starts
    avg = m.norm_avg[0].clone()
    g, l = unobserved(*data[2])
    update = m(g, l, observed=MASK)
    norms = g.norm(dim=1)
    want = torch.zeros(P, dtype=F64)
    for i in ROWS:  # by hand: each auxiliary task towards the target's average as it stands
        m_i = 0.9 * float(avg[i]) + (1 - 0.9) * float(norms[i])
        want += (0.7 * float(avg[OFF]) / m_i + 0.3) * g[i]
    assert close(update, want, 1e-12)
    assert float(m.norm_avg[0, OFF]) == float(avg[OFF])


# --- no task observed, bad masks, the observed-but-zero case ---------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_no_task_observed_gives_a_zero_update_and_moves_nothing(name):
    m = build(name)
    grads, losses = batches(1, seed=10)[0]
    call(m, grads, losses, list(range(K)))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    for p in m.parameters():
        p.grad = None
    out = call(m, torch.zeros(K, P, dtype=F64), torch.zeros(K, dtype=F64), [], observed=torch.zeros(K, dtype=bool))
    assert torch.count_nonzero(out) == 0 and out.shape == (P,)
    for key, value in m.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize(
    "bad", [torch.ones(K - 1, dtype=torch.bool), torch.ones(K), [1, 0, 1, 1], torch.ones(1, K, dtype=torch.bool)]
)
def test_a_malformed_mask_is_refused(bad):
    grads, losses = batches(1)[0]
    with pytest.raises(ValueError, match=r"observed must be a K-vector of bools \(K=4\)"):
        FACTORIES["mgda"]()(grads, losses, observed=bad)


def test_observed_zero_gradient_and_unobserved_task_differ_for_mgda():
    """An observed task with a zero gradient is stationary: MGDA's min-norm point is 0. The same
    zero row flagged unobserved is left out, and the update is MGDA on the others."""
    grads, losses = batches(1, seed=11)[0]
    g, l = unobserved(grads, losses)
    assert torch.count_nonzero(FACTORIES["mgda"]()(g, l)) == 0
    update = FACTORIES["mgda"]()(g, l, observed=MASK)
    assert close(update, FACTORIES["mgda"]()(grads[ROWS]))
    assert all(float(update @ grads[i]) > 0 for i in ROWS)  # a common descent direction of the others


def test_cograd_steps_with_one_observed_task_do_not_count_as_invisible_corrections():
    """With one task observed there is no other task to correct towards: such steps (however many)
    are no sign of a too small gamma, so they neither warn nor count towards the warning."""
    m = FACTORIES["cograd"]()
    gen = torch.Generator().manual_seed(13)
    only_first = torch.tensor([True, False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            g = torch.randn(2, P, generator=gen, dtype=F64)
            g[1] = 0
            assert close(m(g, torch.tensor([0.5, 0.0], dtype=F64), observed=only_first), g[0], 1e-15)
    assert m.stats["relative_correction"] == [0.0, 0.0]
