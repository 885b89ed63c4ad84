"""The torch-rechub bridge (plugins/rechub.py) against torch-rechub itself.

The team's rows (encoded ids and raw dense values) go to torch-rechub's own model directly, and
through a Parquet file and cogradctl's encoding to the bridge; the bridge's sigmoid(logits) must
equal torch-rechub's probabilities. Skipped, with the reason, without the ``rechub`` extra.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import data, models, taskgrad
from cogradctl.errors import UsageError

NEEDS = 'torch-rechub is not installed: pip install -e ".[rechub]" (CI installs it)'
ROWS = 256
TOL = 1e-6

FEATURES = [
    {"name": "user", "vocab_size": 40, "embed_dim": 4},
    {"name": "item", "vocab_size": 25, "embed_dim": 4},
    {"name": "prev_item", "vocab_size": 25, "embed_dim": 4, "shared_with": "item"},
    {"name": "age", "type": "dense"},
]
TOWERS = {"dims": [4], "dropout": 0.0}
# (plugin, torch-rechub class, tasks, config): every bridged model, PLE at one to three levels.
CASES = [
    ("rechub-shared-bottom", "SharedBottom", ["click", "dwell"], {"bottom_params": {"dims": [8]}}),
    ("rechub-mmoe", "MMOE", ["click", "like", "dwell"], {"n_expert": 3, "expert_params": {"dims": [8]}}),
    *[
        (
            "rechub-ple",
            "PLE",
            ["click", "like"],
            {"n_level": n, "n_expert_specific": 2, "n_expert_shared": 1, "expert_params": {"dims": [8]}},
        )
        for n in (1, 2, 3)
    ],
    ("rechub-aitm", "AITM", ["click", "like", "buy"], {"bottom_params": {"dims": [8]}}),
]
ESMM_CONFIG = {
    "user_features": [FEATURES[0]],
    "item_features": FEATURES[1:3],
    "cvr_params": TOWERS,
    "ctr_params": {"dims": [6]},
}
TYPES = {"click": "binary", "like": "binary", "buy": "binary", "dwell": "regression"}


@pytest.fixture(scope="module")
def rechub():
    return pytest.importorskip("torch_rechub", reason=NEEDS)


def team_rows(n: int, seed: int) -> dict[str, np.ndarray]:
    """The team's data: LabelEncoder ids (some ids never occur), a raw dense value, labels."""
    rng = np.random.default_rng(seed)
    return {
        "user": rng.integers(0, 30, n),  # ids 30..39 exist in the embedding only
        "item": rng.integers(3, 25, n),
        "prev_item": rng.integers(0, 25, n),
        "age": rng.normal(38.0, 9.0, n).astype(np.float32),
        **{t: rng.integers(0, 2, n).astype(np.float32) for t in ("click", "like", "buy")},
        "dwell": rng.gamma(2.0, 3.0, n).astype(np.float32),
    }


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    rows = team_rows(ROWS, 0)
    path = tmp_path_factory.mktemp("rechub") / "team.parquet"
    pq.write_table(pa.table(rows), path)
    return rows, path


def encoded(path, tasks):
    """cogradctl's schema and one encoded batch of every row, as `init`/`train` would see them."""
    schema, _ = data.infer_schema(str(path), tasks, {t: TYPES[t] for t in tasks})
    inputs, labels = data.load(str(path), schema).batch(slice(0, None))
    return schema, inputs, labels


def team_inputs(rows) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in rows.items() if k in ("user", "item", "prev_item", "age")}


def case_config(cls_name, tasks, config):
    if cls_name == "ESMM":
        return dict(ESMM_CONFIG)
    return {"features": FEATURES, "tower_params_list": [TOWERS] * len(tasks), **config}


def reference(rechub, bridge, cls_name, tasks, config):
    """torch-rechub's own model with the same constructor arguments and the bridge's weights (strictly)."""
    from cogradctl_plugins import rechub as rb

    cls = getattr(rechub.models.multi_task, cls_name)
    if cls_name == "ESMM":
        args = {
            "user_features": rb.rechub_features(config["user_features"]),
            "item_features": rb.rechub_features(config["item_features"]),
            "cvr_params": config["cvr_params"],
            "ctr_params": config["ctr_params"],
        }
    else:
        args = {k: v for k, v in config.items() if k != "features"}
        args["features"] = rb.rechub_features(config["features"])
        if cls_name == "AITM":
            args["n_task"] = len(tasks)
        else:
            args["task_types"] = ["regression" if TYPES[t] == "regression" else "classification" for t in tasks]
    model = cls(**args)
    model.load_state_dict(bridge.state_dict(), strict=True)
    return model


def perturbed(model):
    """Non-default BatchNorm statistics, so that the buffers matter in eval mode too."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.3)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model


ALL_CASES = [*CASES, ("rechub-esmm", "ESMM", ["click", "buy"], {})]
IDS = ["shared-bottom", "mmoe", "ple-1", "ple-2", "ple-3", "aitm", "esmm"]


def built(name, cls_name, tasks, config, path):
    schema, inputs, labels = encoded(path, tasks)
    torch.manual_seed(0)
    full = case_config(cls_name, tasks, config)
    net, _ = models.build(name, schema, full)
    return schema, inputs, labels, perturbed(net), full


def expected_probabilities(cls_name, out: torch.Tensor) -> torch.Tensor:
    """torch-rechub's output columns the tasks map to: ESMM's are (cvr, ctr, ctcvr) → (ctr, ctcvr)."""
    return out[:, 1:] if cls_name == "ESMM" else out


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name, cls_name, tasks, config", ALL_CASES, ids=IDS)
def test_sigmoid_of_the_logits_is_torch_rechubs_output(rechub, rows, name, cls_name, tasks, config, mode):
    """On the same inputs, and from the team's raw rows (through cogradctl's encoding), to ≤ 1e-6."""
    team, path = rows
    schema, inputs, _, net, full = built(name, cls_name, tasks, config, path)
    ref = reference(rechub, net, cls_name, tasks, full)
    net.train(mode == "train")
    ref.train(mode == "train")
    with torch.no_grad():
        ours = net(inputs)
        same = expected_probabilities(cls_name, ref(net.rechub_inputs(inputs)))
        raw = expected_probabilities(cls_name, ref(team_inputs(team)))
    assert list(ours) == tasks
    for k, t in enumerate(tasks):
        got = torch.sigmoid(ours[t]) if TYPES[t] == "binary" else ours[t]
        diff, diff_raw = ((got - ref[:, k]).abs().max().item() for ref in (same, raw))
        assert diff <= TOL and diff_raw <= TOL, f"{t}: max abs diffs {diff:.3g}, from the raw rows {diff_raw:.3g}"


def test_inputs_are_the_teams_ids_and_values(rechub, rows):
    team, path = rows
    _, inputs, _, net, _ = built(*CASES[1], path)
    x = net.rechub_inputs(inputs)
    for name in ("user", "item", "prev_item"):
        assert x[name].dtype == torch.long and x[name].tolist() == team[name].tolist()
    assert (x["age"] - torch.as_tensor(team["age"])).abs().max().item() < 1e-5  # float32 rounding of ~40


def test_logits_are_read_before_the_sigmoid(rechub, rows):
    """Push a tower 60 logits up: the bridge's logit moves by 60, finite, where torch-rechub's probability is 1."""
    team, path = rows
    schema, inputs, _, net, full = built(*CASES[1], path)
    net.eval()
    with torch.no_grad():
        before = net(inputs)["click"]
        net.towers[0].mlp[-1].bias += 60.0
        after = net(inputs)["click"]
        probs = reference(rechub, net, "MMOE", CASES[1][2], full).eval()(team_inputs(team))[:, 0]
    assert torch.isfinite(after).all() and (probs == 1.0).all()
    assert (after - before - 60.0).abs().max().item() < 1e-4


def test_esmm_ctcvr_logit_is_accurate_where_the_product_saturates():
    pytest.importorskip("torch_rechub", reason=NEEDS)
    from cogradctl_plugins.rechub import logit_of_product

    a = torch.tensor([-30.0, -3.0, 0.0, 0.5, 4.0, 40.0, 40.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.0, -0.2, 7.0, 40.0, 10.0], dtype=torch.float64)
    p = torch.sigmoid(a) * torch.sigmoid(b)
    moderate = torch.log(p[:5]) - torch.log1p(-p[:5])
    assert torch.allclose(logit_of_product(a, b)[:5], moderate, rtol=1e-12, atol=1e-12)
    # 1 − σ(a)σ(b) = 1 − (1 + e^-a)^-1 (1 + e^-b)^-1 ≈ e^-a + e^-b when both are large.
    assert logit_of_product(a, b)[5].item() == pytest.approx(40.0 - math.log(2.0), abs=1e-9)
    assert logit_of_product(a, b)[6].item() == pytest.approx(-math.log(math.exp(-40.0) + math.exp(-10.0)), abs=1e-6)
    assert math.isfinite(logit_of_product(a.float(), b.float())[5].item())


@pytest.mark.parametrize("name, cls_name, tasks, config", ALL_CASES, ids=IDS)
def test_task_parameters_are_exactly_what_one_task_alone_reaches(rechub, rows, name, cls_name, tasks, config):
    _, path = rows
    schema, inputs, labels, net, _ = built(name, cls_name, tasks, config, path)
    net.train()
    models.split_parameters(net, tasks, name)  # each parameter owned by at most one task, some shared
    named = dict(net.named_parameters())
    losses = taskgrad.task_losses(net(inputs), labels, schema)
    reached = {}
    for k, t in enumerate(tasks):
        grads = torch.autograd.grad(losses[k], list(named.values()), retain_graph=True, allow_unused=True)
        reached[t] = {n for n, g in zip(named, grads) if g is not None and bool((g != 0).any())}
    assert set().union(*reached.values()) == set(named), "a parameter no task's loss reaches"
    owned = net.task_parameters()
    for t in tasks:
        alone = reached[t] - set().union(*(reached[u] for u in tasks if u != t))
        assert set(owned[t]) == alone, t


@pytest.mark.parametrize("name, cls_name, tasks, config", ALL_CASES, ids=IDS)
def test_torch_rechub_state_dict_loads_strictly_with_no_renaming(rechub, rows, tmp_path, name, cls_name, tasks, config):
    team, path = rows
    schema, inputs, _, net, full = built(name, cls_name, tasks, config, path)
    torch.manual_seed(1)
    theirs = perturbed(reference(rechub, net, cls_name, tasks, full))
    for p in theirs.parameters():  # weights of their own, not the bridge's
        p.data.normal_(0, 0.2)
    torch.save(theirs.state_dict(), tmp_path / "model.pth")
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    assert net.load_state_dict(state, strict=True)  # the same names: nothing to rename
    assert not any(k.startswith("cogradctl") for k in net.state_dict()), "the id tables are not weights"
    net.eval()
    theirs.eval()
    with torch.no_grad():
        ours = torch.stack([net(inputs)[t] for t in tasks], 1)
        probs = expected_probabilities(cls_name, theirs(team_inputs(team)))
    binary = torch.tensor([TYPES[t] == "binary" for t in tasks])
    assert (torch.where(binary, torch.sigmoid(ours), ours) - probs).abs().max().item() <= TOL


def test_mtl_trainer_uncertainty_weights_are_named_loss_weight(rechub, rows):
    """MTLTrainer's uwl/gradnorm weights join the model as the module 'loss weight': keys 'loss weight.N'."""
    from cogradctl_plugins import rechub as rb
    from torch_rechub.trainers import MTLTrainer

    model = rechub.models.multi_task.MMOE(
        rb.rechub_features(FEATURES), ["classification"] * 2, 2, {"dims": [8]}, [TOWERS] * 2
    )
    plain = set(model.state_dict())
    MTLTrainer(model, ["classification"] * 2, adaptive_params={"method": "uwl"})
    assert set(model.state_dict()) - plain == {"loss weight.0", "loss weight.1"}


def test_unseen_ids_map_to_oov_id(rechub, rows, tmp_path):
    _, path = rows
    schema, _, _ = encoded(path, ["click", "like"])
    cfg = case_config("MMOE", ["click", "like"], CASES[1][3])
    net, _ = models.build("rechub-mmoe", schema, {**cfg, "oov_id": 7})
    new = team_rows(8, 1)
    new["user"][:4] = [35, 36, 0, 29]  # 35 and 36 were never seen at init
    pq.write_table(pa.table(new), tmp_path / "new.parquet")
    with pytest.warns(UserWarning, match="without a row of their own"):
        inputs, _ = data.load(str(tmp_path / "new.parquet"), schema).batch(slice(0, None))
    x = net.rechub_inputs(inputs)
    assert x["user"][:4].tolist() == [7, 7, 0, 29]
    assert x["item"].tolist() == new["item"].tolist() and x["prev_item"].tolist() == new["prev_item"].tolist()
    assert torch.allclose(x["age"], torch.as_tensor(new["age"]), atol=1e-4)  # standardisation undone


@pytest.mark.parametrize(
    "change, message",
    [
        ({"features": [{"name": "nope", "vocab_size": 3}]}, "'nope' is not a categorical feature"),
        ({"features": [{"name": "age", "vocab_size": 3}]}, "--categorical"),
        ({"features": [{"name": "user", "type": "dense"}]}, "--dense"),
        ({"features": [{"name": "user", "vocab_size": 10}]}, "outside the embedding's vocab_size 10"),
        ({"features": [{"name": "user", "vocab_size": 40, "pooling": "mean"}]}, "unknown key(s) pooling"),
        ({"features": [{"name": "user", "type": "sequence", "vocab_size": 40}]}, "SequenceFeature"),
        ({"tower_params_list": [TOWERS]}, "one tower per task (2: click, like)"),
        ({"task_types": ["classification", "regression"]}, "disagree"),
        ({"oov_id": 40}, "oov_id 40 is outside"),
        ({"expert_params": {"dims": []}}, "non-empty list"),
    ],
)
def test_config_errors_name_the_problem(rechub, rows, change, message):
    _, path = rows
    schema, _, _ = encoded(path, ["click", "like"])
    cfg = {**case_config("MMOE", ["click", "like"], CASES[1][3]), **change}
    with pytest.raises(UsageError) as err:
        models.build("rechub-mmoe", schema, cfg)
    assert message in str(err.value)


def test_string_ids_are_refused(rechub, tmp_path):
    pq.write_table(pa.table({"user": ["a", "b", "a"], "click": [0, 1, 0]}), tmp_path / "s.parquet")
    schema, _, _ = encoded(tmp_path / "s.parquet", ["click"])
    cfg = {"features": [{"name": "user", "vocab_size": 3}], "bottom_params": {"dims": [4]}, "tower_params_list": [{}]}
    with pytest.raises(UsageError, match="encoded integer ids"):
        models.build("rechub-shared-bottom", schema, cfg)


def test_without_the_extra_the_bridge_reports_how_to_install_it():
    """torch_rechub made unimportable: the rechub plugins fail to load with the install command; the rest load."""
    code = (
        "import json, sys\n"
        "sys.modules['torch_rechub'] = None\n"
        "from cogradctl import registry\n"
        "print(json.dumps({n: e.error for n, e in registry.discover('models').items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    errors = json.loads(out)
    for name in ("rechub-shared-bottom", "rechub-mmoe", "rechub-ple", "rechub-aitm", "rechub-esmm"):
        assert 'pip install -e ".[rechub]"' in errors[name]
    assert errors["mmoe"] is None and errors["ple"] is None and errors["shared-bottom"] is None


# ---------------------------------------------------------------------------- the round trip through the CLI

ROUND_TRIP = {
    "features": FEATURES,
    "n_expert": 3,
    "expert_params": {"dims": [8]},
    "tower_params_list": [TOWERS, TOWERS],
}


def train_with_torch_rechub(rechub, rows, out_dir):
    """torch-rechub's own MTLTrainer, uncertainty weighting on: it saves model_base_0.pth (with 'loss weight.N')."""
    from cogradctl_plugins import rechub as rb
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    torch.manual_seed(0)
    model = rechub.models.multi_task.MMOE(
        rb.rechub_features(FEATURES), ["classification"] * 2, 3, {"dims": [8]}, [TOWERS] * 2
    )
    x = {k: rows[k] for k in ("user", "item", "prev_item", "age")}
    y = np.stack([rows["click"], rows["like"]], axis=1)
    train, valid, _ = DataGenerator(x, y).generate_dataloader(x_val=x, y_val=y, x_test=x, y_test=y, batch_size=64)
    trainer = MTLTrainer(
        model, ["classification"] * 2, adaptive_params={"method": "uwl"}, n_epoch=2, model_path=str(out_dir)
    )
    trainer.fit(train, valid)
    return out_dir / "model_base_0.pth"


def rechub_mmoe(rechub, state):
    from cogradctl_plugins import rechub as rb

    model = rechub.models.multi_task.MMOE(
        rb.rechub_features(FEATURES), ["classification"] * 2, 3, {"dims": [8]}, [TOWERS] * 2
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def max_diff(ckpt_path, reference, team, path):
    """Largest |sigmoid(cogradctl's logit) − torch-rechub's probability| over the team's rows."""
    _, net, _ = models.from_checkpoint(ckpt_path)
    net.eval()
    schema, inputs, _ = encoded(path, ["click", "like"])
    with torch.no_grad():
        ours = torch.sigmoid(torch.stack([net(inputs)[t] for t in ("click", "like")], 1))
        return (ours - reference(team_inputs(team))).abs().max().item()


def test_round_trip_with_a_model_trained_by_torch_rechub(rechub, rows, tmp_path, cli):
    """torch-rechub trains → import → same predictions → cogradctl trains → export → torch-rechub loads it strictly."""
    team, path = rows
    weights = train_with_torch_rechub(rechub, team, tmp_path)
    saved = torch.load(weights, weights_only=True)
    assert {"loss weight.0", "loss weight.1"} <= set(saved)
    theirs = rechub_mmoe(rechub, {k: v for k, v in saved.items() if not k.startswith("loss weight.")})

    config = [a for k, v in ROUND_TRIP.items() for a in ("--config", f"{k}={json.dumps(v)}")]
    imported = tmp_path / "imported.safetensors"
    r = cli(
        "import", "--model", "rechub-mmoe", "--weights", weights, "--data", path, "--tasks", "click,like",
        "--ignore-keys", "loss weight.*", "--out", imported, *config,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert max_diff(imported, theirs, team, path) <= TOL

    run = tmp_path / "run"
    r = cli(
        "train", "--checkpoint", imported, "--data", path, "--method", "cograd", "--epochs", "1",
        "--batch-size", "64", "--out", run, "--quiet",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    exported = tmp_path / "exported.pt"
    r = cli("export", run / "last.safetensors", "--out", exported)
    assert r.exit_code == 0, r.output
    state = torch.load(exported, weights_only=True)
    assert not any(k.startswith("loss weight") for k in state)
    trained = rechub_mmoe(rechub, state)  # strict: every key of torch-rechub's MMOE, nothing else
    moved = max((state[k].float() - v.float()).abs().max().item() for k, v in theirs.state_dict().items())
    assert moved > 1e-4, "cogradctl's training changed the weights"
    assert max_diff(run / "last.safetensors", trained, team, path) <= TOL


def test_identity_encoded_ids_reach_the_model_as_they_are(rechub, rows, tmp_path):
    """With --encoding COL=identity:N (issue #23) an id the import sample lacks keeps its own row."""
    from cogradctl.encodings import parse_spec
    from cogradctl.infer import SchemaOptions, infer_from_options

    _, path = rows
    sizes = {"user": 40, "item": 25, "prev_item": 25}
    specs = {c: parse_spec(c, f"identity:{n}") for c, n in sizes.items()}
    opts = SchemaOptions(["click", "like"], categorical=["user", "item", "prev_item"], encodings=specs)
    schema, _, _ = infer_from_options(str(path), opts)
    cfg = case_config("MMOE", ["click", "like"], CASES[1][3])
    net, _ = models.build("rechub-mmoe", schema, {**cfg, "oov_id": 7})
    new = team_rows(8, 1)
    new["user"][:4] = [35, 36, 0, 29]  # 35 and 36 never occur in the sample
    pq.write_table(pa.table(new), tmp_path / "new.parquet")
    inputs, _ = data.load(str(tmp_path / "new.parquet"), schema).batch(slice(0, None))
    x = net.rechub_inputs(inputs)
    assert x["user"].tolist() == new["user"].tolist() and x["item"].tolist() == new["item"].tolist()


def test_list_features_are_refused_not_ignored(rechub, rows, tmp_path):
    """A list column becomes a sequence feature at init; the bridge cannot feed it to torch-rechub,
    so building the model says so (exit 2 at init) instead of training without it."""
    _, path = rows
    table = pq.read_table(path)
    table = table.append_column("hist", pa.array([[1, 2]] * table.num_rows, pa.list_(pa.int64())))
    pq.write_table(table, tmp_path / "lists.parquet")
    schema, _ = data.infer_schema(
        str(tmp_path / "lists.parquet"), ["click", "like"], {"click": "binary", "like": "binary"}
    )
    cfg = case_config("MMOE", ["click", "like"], CASES[1][3])
    with pytest.raises(UsageError, match="list feature\\(s\\) hist .* --exclude-features hist"):
        models.build("rechub-mmoe", schema, cfg)
