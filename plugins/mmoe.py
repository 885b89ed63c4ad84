"""MMoE: Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

Shared: the input embeddings and the experts. Per task: its gate (a softmax over the experts,
computed from the input) and its tower.
"""

from __future__ import annotations

import torch
from torch import nn

from cogradctl.layers import FeatureInput, Tower, check_config, mlp, out_dim, owned_by_prefix
from cogradctl.schema import Schema


class MMoE(nn.Module):
    def __init__(
        self,
        schema: Schema,
        embedding_dim: int,
        num_experts: int,
        expert: list[int],
        tower: list[int],
        dropout: float,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        self.tasks = schema.task_names
        self.input = FeatureInput(schema, embedding_dim, pooling)
        d = self.input.out_dim
        self.experts = nn.ModuleList([mlp(d, expert, dropout) for _ in range(num_experts)])
        width = out_dim(d, expert)
        self.gates = nn.ModuleDict({t: nn.Linear(d, num_experts) for t in self.tasks})
        self.towers = nn.ModuleDict({t: Tower(width, tower, dropout) for t in self.tasks})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.input(batch)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # B × E × H
        out = {}
        for t in self.tasks:
            gate = torch.softmax(self.gates[t](x), dim=-1)  # B × E
            out[t] = self.towers[t](torch.einsum("be,beh->bh", gate, experts))
        return out

    def task_parameters(self) -> dict[str, list[str]]:
        return owned_by_prefix(self, {t: (f"gates.{t}.", f"towers.{t}.") for t in self.tasks})


def build(
    schema: Schema,
    embedding_dim: int = 8,
    num_experts: int = 8,
    expert: list[int] = [64],
    tower: list[int] = [32],
    dropout: float = 0.0,
    pooling: str = "mean",
) -> nn.Module:
    """Multi-gate Mixture-of-Experts (Ma et al. 2018): shared experts, a gate and a tower per task."""
    check_config(
        embedding_dim=embedding_dim,
        num_experts=num_experts,
        expert=expert,
        tower=tower,
        dropout=dropout,
        pooling=pooling,
    )
    return MMoE(schema, embedding_dim, num_experts, list(expert), list(tower), dropout, pooling)
