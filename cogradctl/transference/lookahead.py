"""One measured batch: the task losses and shared gradients, the lookahead step on each source
task (plain SGD, or Adam's next step from the second moment saved by ``cogradctl train``), every
target's lookahead loss, and the K×K matrices (see :mod:`cogradctl.transference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from cogradctl.errors import CheckpointError
from cogradctl.models import ParamSplit
from cogradctl.schema import Schema
from cogradctl.taskgrad import TaskGradients, flat_shared, masked_losses, task_losses, unflatten_shared
from cogradctl.transference.groups import Group
from cogradctl.transference.rowsparse import RowAdam, group_columns, lookahead_outputs, table_state

# The default SGD lookahead step α (see docs/transference.md, "Choosing the lookahead step"): large
# enough that loss changes are far above float32 rounding of the losses, small enough to stay near
# the first-order regime on standardised inputs (Z ≈ α g_iᵀ g_j).
DEFAULT_LOOKAHEAD_LR = 0.1
MATRICES = ("transference", "transference_rel", "cosine", "conflict_rate", "gms")
# Per-batch quantities kept for --raw besides the matrices.
PER_BATCH_EXTRA = ("loss_before", "loss_after", "grad_norm")
OPTIM_PREFIX = "optim."
UNTRAINED_MOVED = "untrained_moved"  # per-batch key (optimizer lookahead): indices of v = 0 entries it moved


def SharedGradients(
    model: torch.nn.Module, split: ParamSplit, schema: Schema, device: torch.device | str = "cpu"
) -> TaskGradients:
    """For one batch: the K losses and the K×P matrix of task gradients on the shared parameters only
    (one forward, K backward passes; the graph is freed by the last one)."""
    return TaskGradients(model, split, schema, device, own=False)


@dataclass(frozen=True)
class AdamLookahead:
    """Adam's saved state over the shared parameters, and the step Adam's next update would take.

    For source gradient g (Adam's update with g in the place of the momentum, docs/transference.md):
    v' = β₂v + (1−β₂)g², v̂' = v'/(1−β₂^(t+1)), step = g/(sqrt(v̂') + ε) (times α by the caller). Folding
    g into v is what Adam does before it divides; without it an entry never trained (v = 0, e.g. the
    OOV row of an embedding) would move by g/ε."""

    v: torch.Tensor  # P, float64: exp_avg_sq
    bias2: torch.Tensor  # P, float64: 1 − β₂^(t+1), t the step count of the entry's tensor
    beta2: float
    eps: float
    # each entry's position in the flat vector of every shared entry (row-sparse tables: the
    # batch's columns are a subset); None: the entries are that vector
    columns: torch.Tensor | None = None

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """K×P source gradients → K×P steps per unit α, computed in ``g``'s dtype (two K×P temporaries)."""
        v, bias2 = self.v.to(g.dtype), self.bias2.to(g.dtype)
        denom = g.square().mul_(1.0 - self.beta2).add_(v, alpha=self.beta2).div_(bias2).sqrt_().add_(self.eps)
        return g / denom

    def untrained_moved(self, g: torch.Tensor) -> np.ndarray:
        """Indices of the entries with v = 0 that some source's gradient moves."""
        moved = torch.nonzero((self.v == 0) & (g != 0).any(0)).reshape(-1)
        return (moved if self.columns is None else self.columns[moved]).cpu().numpy()


def adam_preconditioner(extra: dict[str, torch.Tensor], history: list[dict], split: ParamSplit, source: str):
    """→ (:class:`AdamLookahead` over the shared parameters, the training lr, info dict) from the
    Adam state ``cogradctl train`` saves; CheckpointError (exit 2) when the checkpoint has none.
    ``info["untrained_entries"]``: shared entries whose saved second moment is 0 (never trained).
    With row-sparse tables (``split.tables``) a :class:`RowAdam`, gathered per batch."""
    names = [*split.shared_names, *split.table_names]
    missing = [n for n in names if f"{OPTIM_PREFIX}exp_avg_sq.{n}" not in extra]
    if missing:
        raise CheckpointError(
            f"{source}: no optimizer state for --lookahead optimizer (missing optim.exp_avg_sq.{missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); it is saved by 'cogradctl train' "
            "once it has taken a step — use a checkpoint from such a run, or --lookahead sgd"
        )
    entry = next((h for h in reversed(history) if isinstance(h.get("optimizer"), dict)), None) or {}
    opt = entry.get("optimizer", {})
    beta2 = float(opt.get("betas", [0.9, 0.999])[1])
    eps = float(opt.get("eps", 1e-8))
    lr = float(opt.get("lr", entry.get("lr", 1e-3)))
    vs, bias2 = [], []
    steps = set()
    for n, p in zip(split.shared_names, split.shared):
        v = extra[f"{OPTIM_PREFIX}exp_avg_sq.{n}"].to(device=p.device, dtype=torch.float64).reshape(-1)
        step = float(extra.get(f"{OPTIM_PREFIX}step.{n}", torch.tensor(1.0)).reshape(-1)[0])
        steps.add(step)
        vs.append(v)
        bias2.append(torch.full_like(v, 1.0 - beta2 ** (max(step, 0.0) + 1.0)))
    state = AdamLookahead(torch.cat(vs), torch.cat(bias2), beta2, eps)
    entries, untrained = int(state.v.numel()), int((state.v == 0).sum())
    if split.tables:
        saved, table_steps, table_untrained = table_state(extra, split, beta2, OPTIM_PREFIX)
        steps.update(table_steps)
        entries += sum(p.numel() for p in split.tables)
        untrained += table_untrained
        starts = _starts(split.shared)
        sizes = {n: (a, b) for n, a, b in zip(split.shared_names, starts, starts[1:])}
        state = RowAdam(state.v, state.bias2, saved, sizes, beta2, eps)
    info = {
        "beta2": beta2,
        "eps": eps,
        "step": max(steps) if steps else 0,
        "lr": lr,
        "shared_entries": entries,
        "untrained_entries": untrained,
    }
    return state, lr, info


def _starts(params: list[torch.Tensor]) -> list[int]:
    out = [0]
    for p in params:
        out.append(out[-1] + p.numel())
    return out


def _matrices(before: torch.Tensor, after: torch.Tensor, g: torch.Tensor) -> dict[str, np.ndarray]:
    """The K×K matrices of one batch from base losses (K), lookahead losses (K×K) and gradients."""
    gd = g.double()
    gram = gd @ gd.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    sq = norms[:, None] ** 2 + norms[None, :] ** 2
    gms = torch.where(sq > 0, 2 * denom / sq.clamp_min(1e-300), torch.zeros_like(sq))
    # A task against itself is 1 by definition (0 for a zero gradient), not 1 ± rounding: otherwise a
    # --baseline change of the diagonal is float noise (±1e-16) that reads like a measurement.
    nonzero = (norms > 0).to(gram.dtype)
    cosine.diagonal().copy_(nonzero)
    gms.diagonal().copy_(nonzero)
    return {
        "transference": (before[None, :] - after).cpu().numpy(),
        "transference_rel": (1.0 - after / before[None, :]).cpu().numpy(),
        "cosine": cosine.cpu().numpy(),
        "conflict_rate": (cosine < 0).double().cpu().numpy(),
        "gms": gms.cpu().numpy(),
        "loss_before": before.cpu().numpy(),
        "loss_after": after.cpu().numpy(),
        "grad_norm": norms.cpu().numpy(),
    }


def measure_batch(
    model: torch.nn.Module,
    split: ParamSplit,
    schema: Schema,
    grads,
    inputs,
    labels,
    lookahead_lr: float,
    precond: torch.Tensor | None = None,
    groups: list[Group] | None = None,
    eval_batch: tuple | None = None,
) -> dict:
    """All K×K matrices for one batch, in float64 (``"modules"``: the same per group).

    ``grads`` computes (losses, K×P gradients, _) for a batch (:class:`SharedGradients` or
    ``taskgrad.TaskGradients``); ``precond``: an :class:`AdamLookahead` (Adam's next step; a
    :class:`RowAdam` with row-sparse tables) or a P-vector that scales the SGD step elementwise;
    ``eval_batch`` = (inputs, labels) of the batch the losses are measured on (holdout), default
    the step batch. With row-sparse tables (``split.tables``) the columns are the dense shared
    parameters' and the touched rows' (:mod:`.rowsparse`).
    """
    losses, g, _ = grads(inputs, labels)
    d_step = getattr(grads, "denominators", None)
    sparse = (grads.tables, grads.tables.spans()) if split.tables else None
    if isinstance(precond, RowAdam):
        v, bias2, columns = precond.for_batch(split, *sparse)
        precond = AdamLookahead(v, bias2, precond.beta2, precond.eps, columns)
    if precond is None:
        step = lookahead_lr * g
    elif isinstance(precond, AdamLookahead):
        step = lookahead_lr * precond.direction(g)
    elif sparse is not None:
        raise ValueError("row-sparse tables: no elementwise lookahead scale (its P-vector would be dense)")
    else:  # an elementwise scale (P-vector)
        step = lookahead_lr * g * precond
    k = len(schema.tasks)
    x, y = eval_batch if eval_batch is not None else (inputs, labels)
    with torch.no_grad():
        if eval_batch is None:
            before, d_eval = losses.double(), d_step
        else:
            before, d_eval = masked_losses(model(x), y, schema)
            before = before.double()
        base = flat_shared(split)
        after = torch.empty(k, k, dtype=torch.float64, device=before.device)
        for i in range(k):
            after[i] = _lookahead_losses(model, split, schema, base, step[i], (x, y), sparse)
        seen = _seen(d_step, k), _seen(d_eval, k)
        out = _absent(_matrices(before, after, g), *seen)
        if isinstance(precond, AdamLookahead):
            out[UNTRAINED_MOVED] = precond.untrained_moved(g)
        if groups:
            out["modules"] = {}
            for grp in groups:
                moved = torch.empty(k, k, dtype=torch.float64, device=before.device)
                for i in range(k):
                    moved[i] = _lookahead_losses(model, split, schema, base, step[i], (x, y), sparse, grp)
                index = grp.index if sparse is None else group_columns(sparse[1], grp.params, g.device)
                out["modules"][grp.name] = _absent(_matrices(before, moved, g.index_select(1, index)), *seen)
    return out


def _lookahead_losses(model, split, schema, base, step, batch, sparse=None, group: Group | None = None):
    """Every target's loss on ``batch`` after one source's ``step`` (a row of the step matrix) on
    every shared parameter (``base`` − step), or on ``group``'s only; ``sparse``: (``TableRows``,
    its spans) with row-sparse tables (:func:`.rowsparse.lookahead_outputs`)."""
    x, y = batch
    if sparse is not None:
        out = lookahead_outputs(model, split, *sparse, step, x, None if group is None else set(group.params))
    elif group is None:
        out = functional_call(model, unflatten_shared(split, base - step), (x,))
    else:
        params = dict(zip(split.shared_names, split.shared))
        chunks = torch.split(step.index_select(0, group.index), [params[n].numel() for n in group.params])
        stepped = {n: params[n].detach() - c.view_as(params[n]) for n, c in zip(group.params, chunks)}
        out = functional_call(model, stepped, (x,))
    return task_losses(out, y, schema).double()


def _seen(d: torch.Tensor | None, k: int) -> np.ndarray:
    """Which tasks had an observed row of positive weight (``masked_losses``' denominators > 0)."""
    return np.ones(k, dtype=bool) if d is None else (d > 0).cpu().numpy()


def _absent(out: dict[str, np.ndarray], source: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """NaN for the entries a batch says nothing about: a source task with no observed row in the step
    batch (no gradient: its row, and its pairs' cosine, conflict and gms), a target task with none
    in the batch its losses are measured on (its column). ``summarise`` leaves them out of the mean."""
    if source.all() and target.all():
        return out
    out = {key: value.copy() for key, value in out.items()}  # .numpy() may share the tensors' memory
    for key in ("transference", "transference_rel", "loss_after"):
        out[key][~source, :] = np.nan
        out[key][:, ~target] = np.nan
    for key in ("cosine", "conflict_rate", "gms"):
        out[key][~source, :] = np.nan
        out[key][:, ~source] = np.nan
    out["loss_before"][~target] = np.nan
    out["grad_norm"][~source] = np.nan
    return out
