"""measure-transference: per-module, optimizer and holdout lookaheads against brute force; task
correlation; the CLI's JSON, baseline/delta, gates, raw table, plot; train --measure-every."""

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from cogradctl import checkpoint as ckpt_io
from cogradctl import data as data_io
from cogradctl import models, sample
from cogradctl import transference as tr
from cogradctl.cli import app
from cogradctl.console import Log
from cogradctl.taskgrad import task_losses
from cogradctl.train import TrainConfig, train

TASKS = ["click", "like", "share"]
CONFIG = {"num_experts": 2, "expert": [8], "tower": [4], "embedding_dim": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small data, an initial checkpoint and one fine-tuned a few steps from it (with Adam state)."""
    root = tmp_path_factory.mktemp("transference")
    sample.write(sample.generate(900, seed=3), root / "train.parquet")
    schema, _ = data_io.infer_schema(str(root / "train.parquet"), TASKS, {t: "binary" for t in TASKS})
    torch.manual_seed(0)
    net, config = models.build("mmoe", schema, CONFIG)
    init = root / "init.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, schema, net.state_dict(), []), init)
    cfg = TrainConfig(
        checkpoint=str(init),
        data=str(root / "train.parquet"),
        out=str(root / "run"),
        lr=1e-2,
        batch_size=128,
        max_steps=8,
        seed=1,
        measure_every=4,
    )
    train(cfg, Log(quiet=True))
    return {
        "root": root,
        "schema": schema,
        "init": init,
        "tuned": root / "run" / "last.safetensors",
        "train": str(root / "train.parquet"),
        "data": data_io.load(str(root / "train.parquet"), schema),
    }


def float64_model(path):
    ckpt, model, _ = models.from_checkpoint(path)
    model.double().eval()
    return ckpt, model, models.split_parameters(model, ckpt.schema.task_names, "mmoe")


def batch64(data, rows):
    inputs, labels = data.batch(slice(*rows))
    return {"dense": inputs["dense"].double(), "categorical": inputs["categorical"]}, labels.double()


def brute_force(model, schema, step_batch, eval_batch, move):
    """Deep copies; backward of one task's loss; ``move(name, param)`` → the step to subtract (or
    None to leave that parameter alone); separate forwards on the evaluation batch."""
    k = len(schema.tasks)
    base = task_losses(model(eval_batch[0]), eval_batch[1], schema).detach()
    z = torch.empty(k, k, dtype=torch.float64)
    for i in range(k):
        stepped = copy.deepcopy(model)
        split = models.split_parameters(stepped, schema.task_names, "mmoe")
        task_losses(stepped(step_batch[0]), step_batch[1], schema)[i].backward()
        with torch.no_grad():
            for name, p in zip(split.shared_names, split.shared):
                delta = move(name, p)
                if delta is not None:
                    p -= delta
        z[i] = base - task_losses(stepped(eval_batch[0]), eval_batch[1], schema).detach()
    return z, base


# ---------------------------------------------------------------------------- library against brute force


def test_default_groups_of_built_in_models(world):
    assert tr.default_group("input.embedding.weight") == "input"
    assert tr.default_group("experts.3.0.weight") == "experts"
    assert tr.default_group("levels.0.shared.1.0.bias") == "levels.0.shared"
    assert tr.default_group("bottom.2.weight") == "bottom"
    _, model, split = float64_model(world["init"])
    assert set(tr.shared_groups(model, split)) == {"input", "experts"}


def test_plugin_shared_groups_override_and_remainder(world):
    _, model, split = float64_model(world["init"])
    model.shared_groups = lambda: {"first_expert": ["experts.0.0.weight", "experts.0.0.bias"]}
    groups = tr.shared_groups(model, split)
    assert groups["first_expert"] == ["experts.0.0.weight", "experts.0.0.bias"]
    assert set(groups["(other)"]) == set(split.shared_names) - set(groups["first_expert"])


def test_by_module_matches_moving_only_that_group(world):
    _, model, split = float64_model(world["tuned"])
    schema, alpha = world["schema"], 0.5
    groups = tr.shared_groups(model, split)
    batch = batch64(world["data"], (0, 300))
    out = tr.measure_batch(
        model,
        split,
        schema,
        tr.SharedGradients(model, split, schema),
        *batch,
        alpha,
        groups=tr._groups(split, groups, "cpu"),
    )
    for name in ("experts", "input"):
        members = set(groups[name])
        ref, _ = brute_force(
            model, schema, batch, batch, lambda n, p, members=members: alpha * p.grad if n in members else None
        )
        assert abs(ref).max() > 1e-5
        torch.testing.assert_close(torch.tensor(out["modules"][name]["transference"]), ref, rtol=0, atol=1e-6)
    # cosine restricted to the group: gradients of that group's parameters only
    g = tr.SharedGradients(model, split, schema)(*batch)[1]
    idx = tr._groups(split, {"experts": groups["experts"]}, "cpu")[0].index
    ge = g[:, idx]
    cos = (ge @ ge.T) / torch.outer(ge.norm(dim=1), ge.norm(dim=1))
    torch.testing.assert_close(torch.tensor(out["modules"]["experts"]["cosine"]), cos, rtol=0, atol=1e-9)


def test_optimizer_lookahead_is_adams_next_step(world):
    ckpt, model, split = float64_model(world["tuned"])
    schema = world["schema"]
    state, lr, info = tr.adam_preconditioner(ckpt.extra, ckpt.history, split, "tuned")
    assert lr == pytest.approx(1e-2) and info["step"] == 8
    batch = batch64(world["data"], (300, 600))
    out = tr.measure_batch(model, split, schema, tr.SharedGradients(model, split, schema), *batch, lr, precond=state)

    def adam_step(name, p):  # by hand: v' = β2 v + (1 − β2) g², v̂' = v' / (1 − β2^(t+1)); lr · g / (sqrt(v̂') + ε)
        v = ckpt.extra[f"optim.exp_avg_sq.{name}"].double()
        t = float(ckpt.extra[f"optim.step.{name}"])
        v_next = 0.999 * v + 0.001 * p.grad.square()
        return lr * p.grad / ((v_next / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)

    ref, _ = brute_force(model, schema, batch, batch, adam_step)
    assert abs(ref).max() > 1e-5
    torch.testing.assert_close(torch.tensor(out["transference"]), ref, rtol=0, atol=1e-6)


def test_optimizer_lookahead_without_state_is_an_input_error(world):
    ckpt, model, split = float64_model(world["init"])
    with pytest.raises(ckpt_io.CheckpointError, match="no optimizer state"):
        tr.adam_preconditioner(ckpt.extra, ckpt.history, split, "init")


def test_holdout_steps_on_one_batch_and_measures_on_the_next(world):
    _, model, split = float64_model(world["tuned"])
    schema, data = world["schema"], world["data"]
    data64 = data_io.Dataset(data.dense.double(), data.categorical, data.labels.double(), data.sources)
    per_batch, measured = tr.measure_per_batch(
        model, split, schema, data64, batches=2, batch_size=200, lookahead_lr=0.5, seed=4, holdout=True
    )
    assert len(per_batch) == 2
    ranges = tr.pick_batches(len(data), 3, 200, 4)
    for t in range(2):
        assert measured[t]["rows"] == list(ranges[t]) and measured[t]["evaluated_on"]["rows"] == list(ranges[t + 1])
        ref, base = brute_force(
            model, schema, batch64(data, ranges[t]), batch64(data, ranges[t + 1]), lambda n, p: 0.5 * p.grad
        )
        torch.testing.assert_close(torch.tensor(per_batch[t]["transference"]), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            torch.tensor(per_batch[t]["transference_rel"]), ref / base[None, :], rtol=0, atol=1e-6
        )


def test_transference_and_cosine_rise_with_task_correlation(tmp_path):
    """Synthetic tasks a, b with cos(w_a, w_b) = ρ: after brief training, Z_rel(a→b) and cos(a, b) grow with ρ."""
    z, cos = [], []
    for rho in (-0.8, 0.0, 0.9):
        path = tmp_path / f"rho{rho}.parquet"
        sample.write(sample.generate(2000, {"a": (1.0, 0.3), "b": (rho, 0.3)}, seed=0), path)
        schema, _ = data_io.infer_schema(str(path), ["a", "b"], {"a": "binary", "b": "binary"})
        torch.manual_seed(0)
        net, _ = models.build("shared-bottom", schema, {})
        split = models.split_parameters(net, ["a", "b"], "shared-bottom")
        data = data_io.load(str(path), schema)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for step in range(40):
            inputs, labels = data.batch(slice((step % 8) * 250, (step % 8) * 250 + 250))
            opt.zero_grad()
            task_losses(net(inputs), labels, schema).sum().backward()
            opt.step()
        r = tr.measure(net, split, schema, data, batches=4, batch_size=500, seed=0)
        z.append(r["transference_rel"][0][1])
        cos.append(r["cosine"][0][1])
    assert z[0] < z[1] < z[2], z
    assert cos[0] < cos[1] < cos[2], cos
    assert z[0] < 0 < z[2] and cos[0] < 0 < cos[2]


# ---------------------------------------------------------------------------- the command


def cli(*args):
    result = CliRunner().invoke(app, ["measure-transference", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_json_schema_baseline_delta_and_determinism(world, tmp_path):
    args = [
        "--checkpoint",
        world["tuned"],
        "--data",
        world["train"],
        "--batches",
        3,
        "--batch-size",
        150,
        "--seed",
        2,
        "--quiet",
    ]
    code, out, err = cli(
        *args,
        "--json",
        "--baseline",
        world["init"],
        "--by-module",
        "--normalize-rows",
        "--raw",
        tmp_path / "raw.parquet",
    )
    assert code == 0, err
    doc = json.loads(out)
    keys = {
        "tasks",
        "transference",
        "transference_rel",
        "cosine",
        "conflict_rate",
        "gms",
        "stderr",
        "lookahead_lr",
        "batches",
        "batch_size",
        "measured",
    }
    assert keys <= set(doc) and doc["tasks"] == TASKS and doc["lookahead_lr"] == 0.1 and doc["batches"] == 3
    for key in ("transference", "transference_rel", "cosine", "conflict_rate", "gms"):
        assert np.array(doc[key]).shape == (3, 3) and np.array(doc["stderr"][key]).shape == (3, 3)
        assert np.array(doc["baseline"][key]).shape == (3, 3)
        np.testing.assert_allclose(doc["delta"][key], np.array(doc[key]) - np.array(doc["baseline"][key]), atol=1e-12)
    assert np.array(doc["transference_rel_normalized"]).diagonal() == pytest.approx(1.0)
    assert set(doc["modules"]) == {"input", "experts"} and np.array(
        doc["modules"]["experts"]["transference_rel"]
    ).shape == (3, 3)
    assert {v for row in doc["delta"]["verdict"] for v in row} <= {"improved", "worsened", "unchanged"}
    assert doc["baseline"]["measured"] == doc["measured"]  # the same batches
    # --raw: one row per checkpoint × module ("*" = all shared parameters) × batch × ordered pair (diagonal included)
    raw = pq.read_table(tmp_path / "raw.parquet").to_pylist()
    whole = [r for r in raw if r["module"] == "*" and r["checkpoint"] == "checkpoint"]
    assert len(whole) == 3 * 3 * 3 and len(raw) == 2 * 3 * 3 * 3 * 3
    first = [r for r in whole if r["batch"] == 0 and r["source"] == "like" and r["target"] == "share"][0]
    assert first["loss_before"] - first["loss_after"] == pytest.approx(first["transference"], abs=1e-9)
    # determinism: the same seed and data give identical numbers
    code2, out2, _ = cli(*args, "--json", "--baseline", world["init"], "--by-module", "--normalize-rows")
    assert code2 == 0 and json.loads(out2) == doc


def test_gates_exit_3_naming_the_pair_and_0_when_they_pass(world):
    args = ["--checkpoint", world["tuned"], "--data", world["train"], "--batches", 2, "--batch-size", 150, "--quiet"]
    code, out, err = cli(*args, "--json", "--min-transference", 0.5)
    assert code == 3, err
    assert json.loads(out)["tasks"] == TASKS  # the results are printed before the gate fails
    line = err.strip()
    assert "\n" not in line and "--min-transference 0.5" in line and "→" in line and "Z_rel" in line
    assert any(f"{a} → {b}" in line for a in TASKS for b in TASKS if a != b)
    code, out, err = cli(*args, "--min-transference", -1, "--max-conflict-rate", 1.0)
    assert code == 0, err
    assert "transference summary" in out
    code, _, err = cli(
        *args, "--baseline", world["init"], "--max-regression", -1
    )  # any pair "regresses" by more than −1
    assert code == 3 and "--max-regression -1" in err and "fell from" in err
    code, _, err = cli(*args, "--baseline", world["init"], "--max-regression", 1)
    assert code == 0, err
    code, _, err = cli(*args, "--max-regression", 0.1)
    assert code == 2 and "--baseline" in err


def test_input_errors_exit_2(world, tmp_path):
    args = ["--data", world["train"], "--batches", 1, "--batch-size", 100, "--quiet"]
    code, _, err = cli("--checkpoint", world["init"], *args, "--lookahead", "optimizer")
    assert code == 2 and "no optimizer state" in err
    code, _, err = cli("--checkpoint", world["tuned"], *args, "--lookahead", "optimizer")
    assert code == 0, err
    # a baseline with other tasks
    other = tmp_path / "other.safetensors"
    schema, _ = data_io.infer_schema(world["train"], ["click", "like"], {"click": "binary", "like": "binary"})
    net, config = models.build("mmoe", schema, CONFIG)
    ckpt_io.save(ckpt_io.Checkpoint("mmoe", config, schema, net.state_dict(), []), other)
    code, _, err = cli("--checkpoint", world["tuned"], *args, "--baseline", other)
    assert code == 2 and "click, like" in err and "click, like, share" in err


def test_plot_writes_a_png(world, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "heat.png"
    code, _, err = cli(
        "--checkpoint",
        world["tuned"],
        "--data",
        world["train"],
        "--batches",
        2,
        "--batch-size",
        100,
        "--quiet",
        "--baseline",
        world["init"],
        "--plot",
        png,
    )
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_measure_every_writes_transference_records(world):
    records = [json.loads(line) for line in (world["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in records if "transference" in r]
    assert [r["step"] for r in measured] == [4, 8]
    for r in measured:
        assert r["transference"]["tasks"] == TASKS and np.array(r["transference"]["transference_rel"]).shape == (3, 3)
        assert set(r["transference"]["stderr"]) >= {"transference", "cosine"}
