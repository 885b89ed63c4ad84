"""The numerical core against independent oracles: per-task gradients, transference, one training step."""

import copy

import pytest
import torch

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl import models, sample
from cogradctl.console import Log
from cogradctl.taskgrad import TaskGradients, task_losses
from cogradctl.train import TrainConfig, train
from cogradctl.transference import measure, measure_batch, pick_batches


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small dataset, its schema and a freshly initialised checkpoint of a small MMoE."""
    root = tmp_path_factory.mktemp("engine")
    sample.write(sample.generate(1200, seed=3), root / "train.parquet")
    schema, _ = data_io.infer_schema(
        str(root / "train.parquet"), ["click", "like", "share"], {t: "binary" for t in ["click", "like", "share"]}
    )
    torch.manual_seed(0)
    net, config = models.build("mmoe", schema, {"num_experts": 3, "expert": [16], "tower": [8]})
    path = root / "init.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, schema, net.state_dict(), []), path)
    return {"root": root, "schema": schema, "ckpt": path, "data": data_io.load(str(root / "train.parquet"), schema)}


def fresh_model(world, dtype=torch.float32):
    _, model, split = models.from_checkpoint(world["ckpt"])
    model.to(dtype)
    return model, models.split_parameters(model, world["schema"].task_names, "mmoe")


def test_task_gradients_match_separate_backward_passes(world):
    model, split = fresh_model(world)
    inputs, labels = world["data"].batch(slice(0, 256))
    losses, g, own = TaskGradients(model, split, world["schema"])(inputs, labels)
    for i, task in enumerate(world["schema"].task_names):
        # Oracle: an independent copy, a fresh forward, backward of this one loss only.
        ref = copy.deepcopy(model)
        ref_split = models.split_parameters(ref, world["schema"].task_names, "mmoe")
        loss = task_losses(ref(inputs), labels, world["schema"])[i]
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in ref_split.shared])
        torch.testing.assert_close(g[i], expected, rtol=1e-6, atol=1e-8)
        assert float(losses[i]) == pytest.approx(loss.item(), rel=1e-6)
        for mine, p in zip(own[task], ref_split.tasks[task]):
            torch.testing.assert_close(mine, p.grad, rtol=1e-6, atol=1e-8)


def brute_force_transference(model, split, schema, inputs, labels, alpha):
    """Deep-copied models, a manual SGD step on one task's loss, separate forwards."""
    k = len(schema.tasks)
    base = task_losses(model(inputs), labels, schema).detach()
    z = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        stepped = copy.deepcopy(model)
        stepped_split = models.split_parameters(stepped, schema.task_names, "mmoe")
        task_losses(stepped(inputs), labels, schema)[i].backward()
        with torch.no_grad():
            for p in stepped_split.shared:
                p -= alpha * p.grad
        after = task_losses(stepped(inputs), labels, schema).detach()
        z[i] = (base - after).double()
    return z, base


def test_transference_matches_brute_force_reference(world):
    model, split = fresh_model(world, torch.float64)  # float64: agreement to 1e-6 is then meaningful
    model.eval()
    schema = world["schema"]
    inputs, labels = world["data"].batch(slice(0, 300))
    inputs = {"dense": inputs["dense"].double(), "categorical": inputs["categorical"]}
    labels = labels.double()
    grads = TaskGradients(model, split, schema)
    mine = measure_batch(model, split, schema, grads, inputs, labels, lookahead_lr=0.5)
    ref, base = brute_force_transference(model, split, schema, inputs, labels, 0.5)
    assert abs(ref).max() > 1e-4  # the step really moves the losses
    torch.testing.assert_close(torch.tensor(mine["transference"]), ref, rtol=0, atol=1e-6)
    rel_ref = ref / base.double()[None, :]
    torch.testing.assert_close(torch.tensor(mine["transference_rel"]), rel_ref, rtol=0, atol=1e-6)


def test_transference_first_order_is_alpha_times_gradient_inner_product(world):
    """Z_{i→j} ≈ α g_iᵀg_j for small α: symmetric to first order, and the error shrinks like α²."""
    model, split = fresh_model(world, torch.float64)
    model.eval()
    schema = world["schema"]
    inputs, labels = world["data"].batch(slice(0, 300))
    inputs = {"dense": inputs["dense"].double(), "categorical": inputs["categorical"]}
    errors = []
    for alpha in (1e-2, 5e-3):
        grads = TaskGradients(model, split, schema)
        result = measure_batch(model, split, schema, grads, inputs, labels.double(), alpha)
        g = grads.grads
        first_order = alpha * (g @ g.T)
        z = torch.tensor(result["transference"])
        errors.append(float((z - first_order).abs().max()))
        assert errors[-1] < 0.05 * float(first_order.abs().max())  # sign and scale of the first-order term
        assert torch.allclose(z, z.T, atol=3 * errors[-1] + 1e-12)  # symmetric up to the second-order term
    assert errors[1] < errors[0] / 3  # halving α divides the second-order error by ~4


def test_measure_is_deterministic_and_reports_batches(world):
    model, split = fresh_model(world)
    a = measure(model, split, world["schema"], world["data"], batches=3, batch_size=200, seed=7)
    b = measure(model, split, world["schema"], world["data"], batches=3, batch_size=200, seed=7)
    assert a == b
    assert a["batches"] == 3 and len(a["measured"]) == 3
    for m in a["measured"]:
        lo, hi = m["rows"]
        assert hi - lo == 200 and m["sources"][0]["file"].endswith("train.parquet")
    assert pick_batches(1200, 3, 200, 7) != pick_batches(1200, 3, 200, 8)


def run_one_step(world, tmp_path, method, options):
    cfg = TrainConfig(
        checkpoint=str(world["ckpt"]),
        data=str(world["root"] / "train.parquet"),
        out=str(tmp_path / method),
        method=method,
        method_options=options,
        lr=1e-2,
        batch_size=128,
        max_steps=1,
        seed=5,
    )
    train(cfg, Log(quiet=True))
    return ckpt_io.load(tmp_path / method / "last.safetensors").state


def oracle_step(world, combine):
    """One Adam step computed independently: per-task grads from separate backward passes,
    combined by ``combine`` on the shared parameters, own-task grads on task parameters."""
    model, split = fresh_model(world)
    schema = world["schema"]
    # The batch train's first step sees: the first of epoch 1 of the seeded stream.
    from cogradctl.stream import ParquetStream

    stream = ParquetStream(str(world["root"] / "train.parquet"), schema)
    inputs, labels = next(stream.batches(128, shuffle=True, seed=5, epoch=1))
    rows = []
    task_grads = {}
    for i, task in enumerate(schema.task_names):
        model.zero_grad()
        task_losses(model(inputs), labels, schema)[i].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in split.shared]))
        task_grads[task] = [p.grad.clone() for p in split.tasks[task]]
    update = combine(torch.stack(rows))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    offset = 0
    for p in split.shared:
        p.grad = update[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for task, grads in task_grads.items():
        for p, g in zip(split.tasks[task], grads):
            p.grad = g
    opt.step()
    return model.state_dict()


def test_one_ew_step_equals_adam_on_summed_gradients(world, tmp_path):
    got = run_one_step(world, tmp_path, "ew", {})
    want = oracle_step(world, lambda g: g.sum(0))
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)


def test_one_cograd_step_matches_the_formula(world, tmp_path):
    gamma = 3.0

    def cograd_raw(g):  # ĝ_i = g_i − γ Σ_{j≠i} g_i⊙g_i⊙g_j, update = Σ ĝ_i
        total = g.sum(0)
        return sum(g[i] - gamma * g[i] * g[i] * (total - g[i]) for i in range(g.shape[0]))

    got = run_one_step(world, tmp_path, "cograd", {"gamma": gamma, "normalize": False})
    want = oracle_step(world, cograd_raw)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-7)
    ew = run_one_step(world, tmp_path / "b", "ew", {})
    assert any(not torch.equal(got[n], ew[n]) for n in got)


def test_training_is_deterministic(world, tmp_path):
    cfg = dict(
        checkpoint=str(world["ckpt"]),
        data=str(world["root"] / "train.parquet"),
        method="cograd",
        batch_size=128,
        epochs=1,
        seed=11,
    )
    train(TrainConfig(out=str(tmp_path / "a"), **cfg), Log(quiet=True))
    train(TrainConfig(out=str(tmp_path / "b"), **cfg), Log(quiet=True))
    a = ckpt_io.load(tmp_path / "a" / "last.safetensors").state
    b = ckpt_io.load(tmp_path / "b" / "last.safetensors").state
    assert all(torch.equal(a[n], b[n]) for n in a)


class FixedGradients:
    """Stands in for TaskGradients: returns the given losses and K×P matrix (own gradients zero)."""

    def __init__(self, split, tasks, losses, grads):
        self.split, self.tasks, self.losses, self.grads = split, tasks, losses, grads

    def __call__(self, inputs, labels, create_graph=False, loss_scale=None):
        own = {t: [torch.zeros_like(p) for p in self.split.tasks[t]] for t in self.tasks}
        return self.losses, self.grads, own


def test_train_step_names_exactly_the_non_finite_tasks(world):
    from cogradctl.errors import Diverged
    from cogradctl.methods import get_method
    from cogradctl.train import LossScaler, train_step

    model, split = fresh_model(world)
    tasks = world["schema"].task_names
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.ones(3, split.num_shared)
    g[1, 7] = float("inf")  # one element of one row
    with pytest.raises(Diverged, match=r"task\(s\) like$"):
        train_step(FixedGradients(split, tasks, torch.ones(3), g), get_method("ew"), opt, {}, None)
    losses = torch.tensor([1.0, 1.0, float("nan")])
    with pytest.raises(Diverged, match=r"task\(s\) share$"):
        train_step(
            FixedGradients(split, tasks, losses, torch.ones(3, split.num_shared)), get_method("ew"), opt, {}, None
        )
    # fp16: the overflow skips the step and halves the scale
    scaler = LossScaler(scale=8.0)
    train_step(FixedGradients(split, tasks, torch.ones(3), g), get_method("ew"), opt, {}, None, scaler=scaler)
    assert scaler.scale == 4.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_train_step_takes_finite_gradients_whose_sum_overflows(world):
    """Every value finite, the total beyond float32's range: a step, not a false divergence."""
    from cogradctl.methods import get_method
    from cogradctl.train import train_step

    model, split = fresh_model(world)
    tasks = world["schema"].task_names
    opt = torch.optim.SGD(model.parameters(), lr=1e-38)
    g = torch.zeros(3, split.num_shared)
    g[0, :2] = 3e38  # the row sums past float32's largest value (3.4e38); ew's update stays finite
    assert not torch.isfinite(g.sum())
    first = split.shared[0].detach().clone()
    train_step(FixedGradients(split, tasks, torch.ones(3), g), get_method("ew"), opt, {}, None)
    assert torch.isfinite(split.shared[0]).all() and not torch.equal(split.shared[0].detach(), first)


@pytest.mark.parametrize("kind,weight_decay", [("adam", 0.0), ("adam", 0.05), ("adamw", 0.05)])
def test_optimizer_step_fast_path_equals_optimizer_step(kind, weight_decay):
    """train_step's Adam/AdamW step (the fused kernel through torch.optim.adam.adam) against
    Optimizer.step on a copy: identical weights and state over steps with a changing lr, a
    second parameter group, a parameter without a gradient on some steps, and a state reload."""
    from cogradctl.train import make_optimizer, optimizer_step

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]
    extra = torch.nn.Parameter(torch.randn(2, generator=gen))  # a method's own parameter group (uw)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    extra_twin = torch.nn.Parameter(extra.detach().clone())
    cfg = TrainConfig(checkpoint="", data="", out="", lr=0.01, optimizer=kind, weight_decay=weight_decay)
    fast, ref = make_optimizer(cfg, params), make_optimizer(cfg, twins)
    fast.add_param_group({"params": [extra], "lr": 0.1})
    ref.add_param_group({"params": [extra_twin], "lr": 0.1})
    calls = []
    real_step = type(fast).step

    def counting_step(self, *args, **kwargs):
        calls.append(self is fast)
        return real_step(self, *args, **kwargs)

    type(fast).step = counting_step
    try:
        for step in range(6):
            for group_f, group_r in zip(fast.param_groups, ref.param_groups):
                group_f["lr"] = group_r["lr"] = group_r["lr"] * 0.7
            for a, b in zip([*params, extra], [*twins, extra_twin]):
                g = torch.randn(a.shape, generator=gen)
                a.grad, b.grad = (None, None) if (a is params[1] and step in (1, 2)) else (g.clone(), g.clone())
            if step == 3:  # resume: the state comes back from a state_dict
                fast.load_state_dict(copy.deepcopy(fast.state_dict()))
            optimizer_step(fast)
            ref.step()
    finally:
        type(fast).step = real_step
    assert calls.count(True) == 1  # only the first step (no state yet) went through Optimizer.step
    for a, b in zip([*params, extra], [*twins, extra_twin]):
        assert torch.equal(a, b)
        sa, sb = fast.state[a], ref.state[b]
        assert all(torch.equal(sa[key], sb[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


def test_optimizer_step_takes_the_ordinary_path_for_sgd():
    from cogradctl.train import make_optimizer, optimizer_step

    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer(TrainConfig(checkpoint="", data="", out="", lr=0.5, optimizer="sgd"), [p])
    p.grad = torch.ones(3)
    optimizer_step(opt)
    assert torch.equal(p.detach(), torch.full((3,), 0.5))


def test_flatten_shared_makes_the_shared_parameters_slices_of_one_vector(world):
    from cogradctl.taskgrad import flatten_shared

    model, split = fresh_model(world)
    inputs, _ = world["data"].batch(slice(0, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = model(inputs)
    flat = flatten_shared(split)
    assert flat is not None and split.flat is flat and flatten_shared(split) is flat  # idempotent
    assert flat.numel() == split.num_shared
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    for name, param in zip(split.shared_names, split.shared):  # same storage, not a copy
        assert param.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), name
    after = model(inputs)
    assert all(torch.equal(outputs[t], after[t]) for t in outputs)
    with torch.no_grad():
        flat.mul_(0.0)  # an optimizer's in-place step on the flat vector moves the model's parameters
    assert all(float(p.detach().abs().max()) == 0.0 for p in split.shared)
    assert any(
        float(p.detach().abs().max()) > 0.0 for ps in split.tasks.values() for p in ps
    )  # task parameters untouched


def test_flatten_shared_leaves_mixed_dtypes_alone(world):
    from cogradctl.taskgrad import flatten_shared

    model, split = fresh_model(world)
    split.shared[0].data = split.shared[0].data.double()
    assert flatten_shared(split) is None and split.flat is None


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_flat_shared_training_matches_per_tensor_training_and_checkpoints_alike(world, kind):
    """Steps with the shared parameters flat give the weights and optimizer state of steps with
    one tensor each; the saved state has the same keys and values, and restores into either."""
    from cogradctl.methods import get_method
    from cogradctl.train import make_optimizer, optimizer_tensors, restore, train_step, trainable

    cfg = TrainConfig(checkpoint="", data="", out="", lr=0.01, optimizer=kind, weight_decay=0.01, momentum=0.9)
    runs = []
    for flat in (True, False):
        model, split = fresh_model(world)
        method = get_method("cograd")
        method.setup(3)
        method.segments = [p.numel() for p in split.shared]
        if flat:
            params, names = trainable(model, split, method)
            assert (
                names[0] is None
                and params[0] is split.flat
                and len(params) == len(list(model.parameters())) - len(split.shared) + 1
            )
        else:
            params, names = list(model.parameters()), [n for n, _ in model.named_parameters()]
        optimizer = make_optimizer(cfg, params)
        grads = TaskGradients(model, split, world["schema"])
        for step in range(4):
            train_step(grads, method, optimizer, *world["data"].batch(slice(step * 128, (step + 1) * 128)))
        runs.append((model, split, optimizer, names, optimizer_tensors(optimizer, names, split)))
    (flat_model, flat_split, flat_opt, flat_names, flat_saved), (ref_model, _, _, _, ref_saved) = runs
    # Elementwise optimizer arithmetic on the same values: equal up to the last bit the vectorised
    # and scalar parts of a kernel may round differently (here: identical).
    for (name, a), b in zip(flat_model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert flat_saved.keys() == ref_saved.keys() and flat_saved
    for key in ref_saved:
        torch.testing.assert_close(flat_saved[key], ref_saved[key], rtol=1e-6, atol=1e-7, msg=key)
    # Resume: a fresh flat optimizer from the per-tensor run's entries has the flat run's state.
    model, split = fresh_model(world)
    params, names = trainable(model, split, torch.nn.Module())
    optimizer = make_optimizer(cfg, params)
    restore(ref_saved, optimizer, names, torch.nn.Module(), None, torch.device("cpu"), split)
    got, want = optimizer.state[split.flat], flat_opt.state[flat_split.flat]
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
