"""The measurement with row-sparse shared embedding tables (``measure-transference --embeddings``,
``train --measure-every`` with ``--embeddings coordinate|sum``; docs/transference.md).

The task gradients come from :class:`cogradctl.taskgrad.TaskGradients` with the tables separated
(:mod:`cogradctl.tables`): a K × (dense P + touched rows × dim) matrix whose columns follow the
model's parameter order (``TableRows.spans``). Rows no lookup touched have a zero gradient in
every task, so they add nothing to a Gram product (cosine, conflict, GMS) and the lookahead step
θ − α·u_i leaves them where they are, for ``sgd`` (u_i = g_i) and ``optimizer`` alike (the step has
no momentum term: u_i = g_i / (sqrt(v̂'_i) + ε) is 0 wherever g_i is). So the lookahead moves the
touched rows only, in place, and puts them back afterwards: no copy of a table is made, and the
matrices equal the dense path's (every row a column) up to float rounding of the gradient sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from cogradctl.models import ParamSplit
from cogradctl.tables import TableRows


def lookahead_outputs(
    model: torch.nn.Module,
    split: ParamSplit,
    rows: TableRows,
    spans: dict[str, tuple[int, int]],
    step: torch.Tensor,
    x,
    names: set[str] | None = None,
):
    """The model's outputs on ``x`` with the shared parameters in ``names`` (None: all of them)
    moved by −``step`` (one source's row, in the matrix's column order): the dense ones through
    ``functional_call`` (``p − step``, as the dense path computes it), each table's touched rows in
    place (``w[rows] − step``), restored exactly (the saved rows copied back) before returning.
    Call under ``torch.no_grad()``."""
    params = dict(zip(split.shared_names, split.shared))
    position = {n: t for t, n in enumerate(split.table_names)}
    moved, saved = {}, []
    try:
        for name, (a, b) in spans.items():
            if names is not None and name not in names:
                continue
            if name in params:
                moved[name] = params[name].detach() - step[a:b].view_as(params[name])
                continue
            t = position[name]
            weight, index = split.tables[t], rows.index[t]
            old = weight.index_select(0, index)
            saved.append((weight, index, old))
            weight.index_copy_(0, index, old - step[a:b].view(-1, weight.shape[1]))
        return functional_call(model, moved, (x,))
    finally:
        for weight, index, old in reversed(saved):
            weight.index_copy_(0, index, old)


def group_columns(spans: dict[str, tuple[int, int]], params: list[str], device) -> torch.Tensor:
    """The matrix columns of a group of shared parameters (this batch's: a table's are its touched rows)."""
    pieces = [torch.arange(*spans[n], device=device) for n in params]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def table_state(extra: dict[str, torch.Tensor], split: ParamSplit, beta2: float, prefix: str):
    """Each row-sparse table's saved ``exp_avg_sq`` as a (rows × dim) tensor in its saved dtype (no
    float64 copy of a table) with 1 − β₂^(t+1) for its step count t (one per table, as the lazy
    optimizer counts); → (those pairs, the step counts, the number of entries with v = 0)."""
    out, steps, untrained = [], [], 0
    for name, weight in zip(split.table_names, split.tables):
        v = extra[f"{prefix}exp_avg_sq.{name}"].to(weight.device).reshape(weight.shape)
        step = float(extra.get(f"{prefix}step.{name}", torch.tensor(1.0)).reshape(-1)[0])
        steps.append(step)
        untrained += int((v == 0).sum())
        out.append((v, 1.0 - beta2 ** (max(step, 0.0) + 1.0)))
    return out, steps, untrained


@dataclass(frozen=True)
class RowAdam:
    """Adam's saved state for a split with row-sparse tables: the dense shared parameters' v and
    1 − β₂^(t+1) (float64 P-vectors, as ``AdamLookahead``), each table's (``table_state``), and
    ``sizes``: each dense parameter's (first, last + 1) in ``v``. ``for_batch`` gathers them in
    the order of a batch's matrix columns."""

    v: torch.Tensor
    bias2: torch.Tensor
    tables: list[tuple[torch.Tensor, float]]
    sizes: dict[str, tuple[int, int]]
    beta2: float
    eps: float

    def for_batch(self, split: ParamSplit, rows: TableRows, spans: dict[str, tuple[int, int]]):
        """→ (v, 1 − β₂^(t+1), and each column's position in the dense path's flat vector of every
        shared entry, tables included), one entry per column of this batch's matrix."""
        position = {n: t for t, n in enumerate(split.table_names)}
        vs, bias2, columns, offset = [], [], [], 0
        for name in spans:
            if name in self.sizes:
                a, b = self.sizes[name]
                vs.append(self.v[a:b])
                bias2.append(self.bias2[a:b])
                columns.append(torch.arange(offset, offset + b - a, device=self.v.device))
                offset += b - a
                continue
            t = position[name]
            table_v, b2 = self.tables[t]
            index = rows.index[t].to(table_v.device)
            dim = table_v.shape[1]
            vs.append(table_v.index_select(0, index).reshape(-1).to(torch.float64))
            bias2.append(torch.full_like(vs[-1], b2))
            columns.append((offset + index[:, None] * dim + torch.arange(dim, device=index.device)).reshape(-1))
            offset += table_v.numel()
        return torch.cat(vs), torch.cat(bias2), torch.cat(columns)
