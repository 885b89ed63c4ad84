"""A plugin whose embedding table is read other than through its module's lookups (tied weights,
``F.embedding``) is refused by row-sparse ``train`` before anything is written (tables.probe)."""

from __future__ import annotations

import textwrap

import pytest

TASKS = "click,like,share"

PLUGIN = """
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn


class Odd(nn.Module):
    def __init__(self, schema, use):
        super().__init__()
        self.tasks, self.use = schema.task_names, use
        cards = [f.cardinality for f in schema.categorical]
        self.register_buffer("offsets", torch.tensor(list(accumulate([0, *cards]))[:-1]), persistent=False)
        self.table = nn.Embedding(sum(cards) + 1, 4)  # its last row: no feature's value
        self.shared = nn.Linear(4 * len(cards), 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in self.tasks})

    def forward(self, batch):
        h = self.shared(self.table(batch["categorical"] + self.offsets).flatten(1))
        if self.use == "tied":  # the table's last row also an output weight (tied weights)
            h = h + (h[:, :4] @ self.table.weight[-1]).unsqueeze(1)
        elif self.use == "functional":  # another lookup of the weight, outside the module
            last = torch.full_like(batch["categorical"][:, 0], self.table.num_embeddings - 1)
            h = h + F.embedding(last, self.table.weight, sparse=True).sum(1, keepdim=True)
        return {t: self.heads[t](h).squeeze(1) for t in self.tasks}

    def task_parameters(self):
        return {t: [n for n, _ in self.named_parameters() if n.startswith(f"heads.{t}.")] for t in self.tasks}


def build(schema, use: str = "plain"):
    return Odd(schema, use)


MODELS = {"odd": build}
"""


@pytest.fixture(scope="module")
def odd(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("odd")
    (root / "plugins").mkdir()
    (root / "plugins" / "odd.py").write_text(textwrap.dedent(PLUGIN))
    return root


def _init(cli, odd, sample_dir, use: str):
    out = odd / f"{use}.safetensors"
    if not out.exists():
        args = ("init", "--model", "odd", "--plugin-path", odd / "plugins", "--data", sample_dir / "train.parquet")
        r = cli(*args, "--tasks", TASKS, "--config", f"use={use}", "--out", out, "--quiet")
        assert r.exit_code == 0, r.output
    return out


def _train(cli, odd, sample_dir, checkpoint, out, embeddings):
    args = ("train", "--checkpoint", checkpoint, "--data", sample_dir / "train.parquet", "--out", out)
    return cli(*args, "--plugin-path", odd / "plugins", "--embeddings", embeddings, "--max-steps", 1, "--device", "cpu")


@pytest.mark.parametrize("use, why", [("tied", "a dense gradient"), ("functional", "rows its module did not look up")])
def test_row_sparse_train_refuses_a_table_read_outside_its_lookups_and_writes_nothing(
    cli, odd, sample_dir, tmp_path, use, why
):
    checkpoint = _init(cli, odd, sample_dir, use)
    out = tmp_path / "run"
    r = _train(cli, odd, sample_dir, checkpoint, out, "coordinate")
    assert r.exit_code == 2, r.output
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.stderr
    line = errors[0]
    assert "table.weight" in line and why in line and "--embeddings dense" in line, line
    assert not out.exists()  # no run directory, no step-0 checkpoint
    assert _train(cli, odd, sample_dir, checkpoint, out, "dense").exit_code == 0  # the suggestion works


def test_a_table_read_only_by_its_lookups_trains_row_sparse(cli, odd, sample_dir, tmp_path):
    checkpoint = _init(cli, odd, sample_dir, "plain")
    r = _train(cli, odd, sample_dir, checkpoint, tmp_path / "run", "coordinate")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "last.safetensors").exists()
