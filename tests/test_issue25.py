"""Issue #25, items 1, 3 and 4: the optimizer lookahead on entries Adam never trained, --batches
capped by the data, and a plugin whose forward breaks the output contract."""

from __future__ import annotations

import copy
import json
import textwrap

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from cogradctl import data as data_io
from cogradctl import models
from cogradctl import transference as tr
from cogradctl.taskgrad import task_losses

TASKS = ["click", "like", "share"]  # the tasks of conftest.base_checkpoint

# ---------------------------------------------------------------------------- 1: untrained Adam entries


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, sample_dir, base_checkpoint, cli):
    """A checkpoint fine-tuned by ``cogradctl train`` for one epoch (Adam state saved; every value
    of the vocabulary trained, the OOV rows not), and a file of the same
    rows whose user_bucket and device values were never seen at init (all map to the OOV row 0,
    which training never touched: its exp_avg_sq is exactly 0)."""
    root = tmp_path_factory.mktemp("issue25")
    out = root / "run"
    args = ["train", "--checkpoint", base_checkpoint, "--data", sample_dir / "train.parquet", "--out", out]
    result = cli(*args, "--epochs", 1, "--batch-size", 256, "--lr", "0.01", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    table = pq.read_table(sample_dir / "train.parquet").slice(0, 1000)
    table = table.set_column(
        table.schema.get_field_index("user_bucket"), "user_bucket", pc.add(table["user_bucket"], 100_000)
    )
    table = table.set_column(
        table.schema.get_field_index("device"), "device", pc.binary_join_element_wise(table["device"], "-new", "")
    )
    pq.write_table(table, root / "unseen.parquet")
    return {"checkpoint": out / "last.safetensors", "unseen": root / "unseen.parquet"}


def measure_json(cli, checkpoint, data, *extra):
    result = cli("measure-transference", "--checkpoint", checkpoint, "--data", data, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_optimizer_lookahead_stays_bounded_on_values_unseen_in_training(tuned, cli):
    args = ("--lookahead", "optimizer", "--batches", 2, "--batch-size", 400, "--device", "cpu")
    doc, err = measure_json(cli, tuned["checkpoint"], tuned["unseen"], *args)
    z = np.array(doc["transference_rel"])
    # Before the fix: α·g/ε on the OOV rows, Z_rel of −3 to −8 (losses multiplied by 4 to 9).
    assert np.isfinite(z).all() and np.abs(z).max() < 0.5, z
    state = doc["lookahead_state"]
    assert 0 < state["untrained_entries_moved"] <= state["untrained_entries"] < state["shared_entries"]
    assert f"{state['untrained_entries_moved']} shared entries that training never updated" in err
    text = cli("measure-transference", "--checkpoint", tuned["checkpoint"], "--data", tuned["unseen"], *args)
    assert text.exit_code == 0 and "training never updated" in text.stdout
    assert f"{state['untrained_entries']} of {state['shared_entries']} in all" in text.stdout.replace("\n", " ")


def test_untrained_entries_the_data_does_not_reach_are_counted_but_not_warned_about(tuned, sample_dir, cli):
    args = ("--lookahead", "optimizer", "--batches", 2, "--batch-size", 400, "--device", "cpu")
    doc, err = measure_json(cli, tuned["checkpoint"], sample_dir / "train.parquet", *args, "--seed", 3)
    state = doc["lookahead_state"]
    assert state["untrained_entries"] > 0 and state["untrained_entries_moved"] == 0  # the OOV rows: no row maps there
    assert "never updated" not in err


def test_optimizer_lookahead_is_adams_next_step_by_hand(tuned):
    """Float64, by hand: v' = β₂v + (1−β₂)g², v̂' = v'/(1−β₂^(t+1)), Δ = α g/(sqrt(v̂') + ε)."""
    ckpt, model, _ = models.from_checkpoint(tuned["checkpoint"])
    model.double().eval()
    schema = ckpt.schema
    split = models.split_parameters(model, schema.task_names, ckpt.model)
    state, lr, info = tr.adam_preconditioner(ckpt.extra, ckpt.history, split, "tuned")
    assert info["untrained_entries"] > 0 and info["step"] == 8  # one epoch of 2000 rows, batches of 256
    data = data_io.load(str(tuned["unseen"]), schema)
    inputs, labels = data.batch(slice(0, 400))
    inputs, labels = {"dense": inputs["dense"].double(), "categorical": inputs["categorical"]}, labels.double()
    out = tr.measure_batch(model, split, schema, tr.SharedGradients(model, split, schema), inputs, labels, lr, state)

    beta2, eps, t = 0.999, 1e-8, 8.0
    base = task_losses(model(inputs), labels, schema).detach()
    ref = torch.empty(len(TASKS), len(TASKS), dtype=torch.float64)
    largest = 0.0
    for i in range(len(TASKS)):
        moved = copy.deepcopy(model)
        moved_split = models.split_parameters(moved, schema.task_names, ckpt.model)
        task_losses(moved(inputs), labels, schema)[i].backward()
        with torch.no_grad():
            for name, p in zip(moved_split.shared_names, moved_split.shared):
                v = ckpt.extra[f"optim.exp_avg_sq.{name}"].double()
                v_next = beta2 * v + (1 - beta2) * p.grad.square()
                delta = lr * p.grad / ((v_next / (1 - beta2 ** (t + 1))).sqrt() + eps)
                largest = max(largest, float(delta.abs().max()))
                p -= delta
        ref[i] = 1 - task_losses(moved(inputs), labels, schema).detach() / base
    assert largest <= lr / np.sqrt(1 - beta2) + 1e-12  # bounded: |Δ| ≤ α/sqrt(1−β₂)
    assert ref.abs().max() > 1e-5
    torch.testing.assert_close(torch.tensor(out["transference_rel"]), ref, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------- 3: --batches capped by the data


def test_batches_beyond_what_the_data_holds_are_reported(tuned, cli):
    doc, err = measure_json(cli, tuned["checkpoint"], tuned["unseen"], "--batches", 20, "--batch-size", 300)
    assert doc["batches"] == 3 and doc["batches_requested"] == 20 and len(doc["measured"]) == 3
    assert "measured 3 of the 20 requested batches" in err and "non-overlapping batches of 300 rows" in err
    text = cli("measure-transference", "--checkpoint", tuned["checkpoint"], "--data", tuned["unseen"], "--batches", 20)
    assert text.exit_code == 0 and "1 of 20 requested batches" in text.stdout.replace("\n", " ")
    doc, err = measure_json(cli, tuned["checkpoint"], tuned["unseen"], "--batches", 2, "--batch-size", 300)
    assert doc["batches"] == doc["batches_requested"] == 2 and "requested" not in err


# ---------------------------------------------------------------------------- 4: the output contract


COLUMN_PLUGIN = '''
import torch
from torch import nn

from cogradctl.layers import FeatureInput, owned_by_prefix


class Column(nn.Module):
    """Returns B×1 per task instead of a B-vector."""

    def __init__(self, schema):
        super().__init__()
        self.tasks = schema.task_names
        self.input = FeatureInput(schema, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(self.input.out_dim, 1) for t in self.tasks})

    def forward(self, batch):
        h = self.input(batch)
        return {t: self.heads[t](h) for t in self.tasks}

    def task_parameters(self):
        return owned_by_prefix(self, {t: (f"heads.{t}.",) for t in self.tasks})


MODELS = {"column": lambda schema: Column(schema)}
'''


@pytest.fixture
def column_plugin(tmp_path):
    root = tmp_path / "plugins"
    root.mkdir()
    (root / "column.py").write_text(textwrap.dedent(COLUMN_PLUGIN))
    return root


def assert_contract_error(result):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "'column'" in line and "'click'" in line and "(4, 1)" in line and "(4,)" in line, line


def test_init_refuses_a_plugin_whose_output_is_b_by_1(column_plugin, sample_dir, tmp_path, cli):
    out = tmp_path / "c.safetensors"
    data = sample_dir / "train.parquet"
    args = ("init", "--model", "column", "--plugin-path", column_plugin, "--data", data, "--tasks", ",".join(TASKS))
    assert_contract_error(cli(*args, "--out", out))
    assert not out.exists()


def test_import_refuses_it_before_writing(column_plugin, sample_dir, tmp_path, cli):
    from safetensors.torch import save_file

    schema, _ = data_io.infer_schema(str(sample_dir / "train.parquet"), TASKS, {t: "binary" for t in TASKS})
    net, _ = models.build("column", schema, {}, [str(column_plugin)])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    out = tmp_path / "c.safetensors"
    args = ("import", "--model", "column", "--plugin-path", column_plugin, "--weights", tmp_path / "w.safetensors")
    assert_contract_error(cli(*args, "--data", sample_dir / "train.parquet", "--tasks", ",".join(TASKS), "--out", out))
    assert not out.exists()


def test_train_refuses_an_old_checkpoint_of_such_a_plugin_and_writes_nothing(column_plugin, sample_dir, tmp_path, cli):
    from cogradctl import checkpoint as ckpt_io

    schema, _ = data_io.infer_schema(str(sample_dir / "train.parquet"), TASKS, {t: "binary" for t in TASKS})
    net, config = models.build("column", schema, {}, [str(column_plugin)])
    old = tmp_path / "old.safetensors"
    ckpt_io.save(ckpt_io.Checkpoint("column", config, schema, net.state_dict(), []), old)
    out = tmp_path / "run"
    args = ("train", "--checkpoint", old, "--data", sample_dir / "train.parquet", "--out", out)
    assert_contract_error(cli(*args, "--plugin-path", column_plugin, "--max-steps", 1, "--device", "cpu"))
    assert not out.exists()


@pytest.mark.parametrize("option", ["--lookahead-lr", "--min-transference", "--max-conflict-rate", "--max-regression"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_before_anything_is_written(
    base_checkpoint, sample_dir, tmp_path, cli, option, value
):
    raw = tmp_path / "raw.parquet"
    args = ("--checkpoint", base_checkpoint, "--data", sample_dir / "train.parquet", "--raw", raw)
    result = cli("measure-transference", *args, f"{option}={value}")
    assert result.exit_code == 2, result.output
    assert option in result.stderr and not raw.exists()


class _Fixed(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.make = make

    def forward(self, batch):
        return self.make(len(batch["dense"]))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda b: [torch.zeros(b)] * 3, "returned list"),
        (lambda b: {"click": torch.zeros(b), "like": torch.zeros(b)}, "no output for task 'share'"),
        (lambda b: {t: torch.zeros(b, dtype=torch.long) for t in TASKS}, "torch.int64"),
        (lambda b: {t: torch.zeros(b + 1) for t in TASKS}, "shape (5,)"),
    ],
)
def test_check_output_names_what_is_wrong(sample_dir, make, words):
    from cogradctl.contract import check_output
    from cogradctl.errors import PluginError

    schema, _ = data_io.infer_schema(str(sample_dir / "train.parquet"), TASKS, {t: "binary" for t in TASKS})
    with pytest.raises(PluginError, match="model 'fixed'") as caught:
        check_output(_Fixed(make), schema, "fixed")
    assert words in str(caught.value)
    check_output(_Fixed(lambda b: {t: torch.zeros(b) for t in TASKS}), schema, "fixed")  # the contract: passes
