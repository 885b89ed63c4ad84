"""Shared-bottom: one MLP shared by all tasks, one tower per task (Caruana 1997)."""

from __future__ import annotations

import torch
from torch import nn

from cogradctl.layers import FeatureInput, Tower, check_config, mlp, out_dim, owned_by_prefix
from cogradctl.schema import Schema


class SharedBottom(nn.Module):
    def __init__(
        self, schema: Schema, embedding_dim: int, bottom: list[int], tower: list[int], dropout: float, pooling: str
    ) -> None:
        super().__init__()
        self.tasks = schema.task_names
        self.input = FeatureInput(schema, embedding_dim, pooling)
        self.bottom = mlp(self.input.out_dim, bottom, dropout)
        width = out_dim(self.input.out_dim, bottom)
        self.towers = nn.ModuleDict({t: Tower(width, tower, dropout) for t in self.tasks})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.bottom(self.input(batch))
        return {t: self.towers[t](h) for t in self.tasks}

    def task_parameters(self) -> dict[str, list[str]]:
        return owned_by_prefix(self, {t: (f"towers.{t}.",) for t in self.tasks})


def build(
    schema: Schema,
    embedding_dim: int = 8,
    bottom: list[int] = [128, 64],
    tower: list[int] = [32],
    dropout: float = 0.0,
    pooling: str = "mean",
) -> nn.Module:
    """Shared-bottom MLP with one tower per task (Caruana 1997)."""
    check_config(embedding_dim=embedding_dim, bottom=bottom, tower=tower, dropout=dropout, pooling=pooling)
    return SharedBottom(schema, embedding_dim, list(bottom), list(tower), dropout, pooling)
