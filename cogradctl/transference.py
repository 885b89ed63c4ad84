"""Pairwise task transference and gradient conflict (docs/methods.md §1).

For each measured batch: one forward and K backward passes give the losses L_j and the shared
gradients g_i; then for each source task i one forward with the shared parameters moved to
θ_s − α g_i (task-specific parameters unchanged, no model copy: ``torch.func.functional_call``)
gives every target's lookahead loss L'_{i,j} at once.

    Z[i, j]     = L_j − L'_{i,j}           absolute loss reduction of target j by a step on source i
    Z_rel[i, j] = 1 − L'_{i,j} / L_j        relative (TAG's inter-task affinity)

Rows are sources, columns targets, the diagonal is each task's own progress. Positive = positive
transfer. Also per batch: cosine of g_i and g_j, whether they conflict (cosine < 0), and gradient
magnitude similarity 2‖g_i‖‖g_j‖/(‖g_i‖²+‖g_j‖²). Reported: the mean over batches and its
standard error.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from cogradctl.data import Dataset
from cogradctl.models import ParamSplit
from cogradctl.schema import Schema
from cogradctl.taskgrad import TaskGradients, flat_shared, task_losses, unflatten_shared

# The default lookahead step: a plain SGD step of this size on one task's mean loss. Large enough
# that loss changes are far above float32 rounding of the losses, small enough to stay near the
# first-order regime on standardised inputs (Z ≈ α g_iᵀ g_j); see docs/methods.md.
DEFAULT_LOOKAHEAD_LR = 0.1


def pick_batches(n_rows: int, batches: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
    """``batches`` non-overlapping contiguous row ranges at seeded random positions, in order."""
    slots = max(n_rows // batch_size, 1)
    size = min(batch_size, n_rows)
    chosen = np.random.default_rng(seed).choice(slots, size=min(batches, slots), replace=False)
    return [(int(s) * size, int(s) * size + size) for s in sorted(chosen)]


def measure_batch(model: torch.nn.Module, split: ParamSplit, schema: Schema, grads: TaskGradients, inputs, labels, lookahead_lr: float) -> dict[str, np.ndarray]:
    """All K×K matrices for one batch, in float64."""
    losses, g, _ = grads(inputs, labels)
    base = flat_shared(split)
    k = len(schema.tasks)
    after = torch.empty(k, k, dtype=torch.float64)
    with torch.no_grad():
        for i in range(k):
            params = unflatten_shared(split, base - lookahead_lr * g[i])
            after[i] = task_losses(functional_call(model, params, (inputs,)), labels, schema).double()
        gram = (g.double() @ g.double().T)
    before = losses.double()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    sq = norms[:, None] ** 2 + norms[None, :] ** 2
    gms = torch.where(sq > 0, 2 * denom / sq.clamp_min(1e-300), torch.zeros_like(sq))
    return {
        "transference": (before[None, :] - after).numpy(),
        "transference_rel": (1.0 - after / before[None, :]).numpy(),
        "cosine": cosine.numpy(),
        "conflict_rate": (cosine < 0).double().numpy(),
        "gms": gms.numpy(),
    }


def measure(
    model: torch.nn.Module,
    split: ParamSplit,
    schema: Schema,
    data: Dataset,
    batches: int = 10,
    batch_size: int = 1024,
    lookahead_lr: float = DEFAULT_LOOKAHEAD_LR,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict:
    """Mean and standard error of every matrix over ``batches`` seeded batches of ``data``."""
    was_training = model.training
    model.eval()  # no dropout noise: the lookahead must compare like with like
    grads = TaskGradients(model, split, schema, device)
    ranges = pick_batches(len(data), batches, batch_size, seed)
    per_batch: dict[str, list[np.ndarray]] = {}
    for start, stop in ranges:
        inputs, labels = data.batch(slice(start, stop), device)
        for key, value in measure_batch(model, split, schema, grads, inputs, labels, lookahead_lr).items():
            per_batch.setdefault(key, []).append(value)
    model.train(was_training)
    result: dict = {"tasks": schema.task_names, "lookahead_lr": lookahead_lr, "batches": len(ranges), "batch_size": stop - start}
    stderr = {}
    for key, values in per_batch.items():
        stack = np.stack(values)
        result[key] = stack.mean(axis=0).tolist()
        stderr[key] = (stack.std(axis=0, ddof=1) / np.sqrt(len(values))).tolist() if len(values) > 1 else np.zeros_like(stack[0]).tolist()
    result["stderr"] = stderr
    result["measured"] = [{"rows": [a, b], "sources": data.describe(a, b)} for a, b in ranges]
    return result
