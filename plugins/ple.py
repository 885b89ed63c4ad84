"""PLE: Progressive Layered Extraction (Tang et al., RecSys 2020).

Each level is a CGC layer with shared experts and task-specific experts; task k's gate mixes its
own experts with the shared ones; below the last level a shared gate mixes all experts into the
next level's shared input. Ownership for cogradctl: a task owns its tower, its last-level experts
and its gates of the last two levels. Lower-level task experts (and the gates feeding them) also
reach the shared gate, so every task's loss depends on them: they are counted as shared parameters
(the gradient methods then coordinate them).
"""

from __future__ import annotations

import torch
from torch import nn

from cogradctl.layers import FeatureInput, Tower, check_config, mlp, out_dim, owned_by_prefix
from cogradctl.schema import Schema


class CGC(nn.Module):
    def __init__(
        self,
        tasks: list[str],
        in_dim: int,
        shared_experts: int,
        task_experts: int,
        expert: list[int],
        dropout: float,
        last: bool,
    ) -> None:
        super().__init__()
        self.tasks, self.last = tasks, last
        self.shared = nn.ModuleList([mlp(in_dim, expert, dropout) for _ in range(shared_experts)])
        self.own = nn.ModuleDict(
            {t: nn.ModuleList([mlp(in_dim, expert, dropout) for _ in range(task_experts)]) for t in tasks}
        )
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, shared_experts + task_experts) for t in tasks})
        if not last:
            self.shared_gate = nn.Linear(in_dim, shared_experts + task_experts * len(tasks))
        self.out_dim = out_dim(in_dim, expert)

    def forward(
        self, task_inputs: dict[str, torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        shared = [e(shared_input) for e in self.shared]
        own = {t: [e(task_inputs[t]) for e in self.own[t]] for t in self.tasks}
        out = {}
        for t in self.tasks:
            experts = torch.stack(own[t] + shared, dim=1)
            gate = torch.softmax(self.gates[t](task_inputs[t]), dim=-1)
            out[t] = torch.einsum("be,beh->bh", gate, experts)
        if self.last:
            return out, None
        everything = torch.stack([e for t in self.tasks for e in own[t]] + shared, dim=1)
        gate = torch.softmax(self.shared_gate(shared_input), dim=-1)
        return out, torch.einsum("be,beh->bh", gate, everything)


class PLE(nn.Module):
    def __init__(
        self,
        schema: Schema,
        embedding_dim: int,
        num_levels: int,
        shared_experts: int,
        task_experts: int,
        expert: list[int],
        tower: list[int],
        dropout: float,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError("num_levels must be at least 1")
        self.tasks = schema.task_names
        self.input = FeatureInput(schema, embedding_dim, pooling)
        dim = self.input.out_dim
        self.levels = nn.ModuleList()
        for level in range(num_levels):
            cgc = CGC(self.tasks, dim, shared_experts, task_experts, expert, dropout, last=level == num_levels - 1)
            self.levels.append(cgc)
            dim = cgc.out_dim
        self.towers = nn.ModuleDict({t: Tower(dim, tower, dropout) for t in self.tasks})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.input(batch)
        task_inputs, shared = {t: x for t in self.tasks}, x
        for cgc in self.levels:
            task_inputs, shared = cgc(task_inputs, shared)
        return {t: self.towers[t](task_inputs[t]) for t in self.tasks}

    def task_parameters(self) -> dict[str, list[str]]:
        last = len(self.levels) - 1
        # Task t's gate at level k feeds task t's experts at level k+1, which feed the shared gate
        # unless k+1 is the last level: only the gates of the last two levels are t's alone.
        prefixes = {
            t: (
                f"towers.{t}.",
                f"levels.{last}.own.{t}.",
                *(f"levels.{k}.gates.{t}." for k in range(max(last - 1, 0), last + 1)),
            )
            for t in self.tasks
        }
        return owned_by_prefix(self, prefixes)


def build(
    schema: Schema,
    embedding_dim: int = 8,
    num_levels: int = 2,
    shared_experts: int = 2,
    task_experts: int = 1,
    expert: list[int] = [64],
    tower: list[int] = [32],
    dropout: float = 0.0,
    pooling: str = "mean",
) -> nn.Module:
    """Progressive Layered Extraction (Tang et al. 2020): CGC levels of shared and task experts."""
    check_config(
        embedding_dim=embedding_dim,
        num_levels=num_levels,
        shared_experts=shared_experts,
        task_experts=task_experts,
        expert=expert,
        tower=tower,
        dropout=dropout,
        pooling=pooling,
    )
    return PLE(
        schema, embedding_dim, num_levels, shared_experts, task_experts, list(expert), list(tower), dropout, pooling
    )
