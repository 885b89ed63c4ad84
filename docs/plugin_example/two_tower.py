"""A complete minimal cogradctl model plugin: load it with `--plugin-path docs/plugin_example`.

A plugin file registers factories in a module-level MODELS dict (an installed package registers
the same factory in the `cogradctl.models` entry-point group instead).
"""

import torch
from torch import nn

from cogradctl.layers import FeatureInput, Tower


class TwoTower(nn.Module):
    def __init__(self, schema, embedding_dim, hidden):
        super().__init__()
        self.tasks = schema.task_names
        self.input = FeatureInput(schema, embedding_dim)  # shared: embeddings + dense features
        self.shared = nn.Sequential(nn.Linear(self.input.out_dim, hidden), nn.ReLU())  # shared
        self.heads = nn.ModuleDict({t: Tower(hidden, [hidden // 2]) for t in self.tasks})  # per task

    def forward(self, batch):
        # batch: {"dense": float32 B×D, "categorical": int64 B×C} → {task: B-vector of logits}
        h = self.shared(self.input(batch))
        return {t: self.heads[t](h) for t in self.tasks}

    def task_parameters(self):
        # task → the parameters only its loss depends on; everything else is shared.
        return {t: [n for n, _ in self.named_parameters() if n.startswith(f"heads.{t}.")] for t in self.tasks}


def build(schema, embedding_dim: int = 4, hidden: int = 32):
    """Tiny shared layer with one head per task (an example plugin)."""
    return TwoTower(schema, embedding_dim, hidden)


MODELS = {"two-tower": build}
