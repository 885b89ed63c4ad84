"""The measurement over batches: seeded batch positions, each batch measured (distributed: split
among processes and gathered back in order), and the summarised result.
"""

from __future__ import annotations

import numpy as np
import torch

from cogradctl.data import Dataset
from cogradctl.distributed import SINGLE, Dist
from cogradctl.errors import UsageError
from cogradctl.models import ParamSplit
from cogradctl.schema import Schema
from cogradctl.transference.groups import build_groups
from cogradctl.transference.lookahead import DEFAULT_LOOKAHEAD_LR, UNTRAINED_MOVED, SharedGradients, measure_batch
from cogradctl.transference.summary import summarise


def pick_batches(n_rows: int, batches: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
    """``batches`` non-overlapping contiguous row ranges at seeded random positions, in order; at
    most ``n_rows // batch_size`` of them (overlapping batches would share rows, so they would not be
    independent and the standard errors over batches would be too small): the caller says so."""
    slots = max(n_rows // batch_size, 1)
    size = min(batch_size, n_rows)
    chosen = np.random.default_rng(seed).choice(slots, size=min(batches, slots), replace=False)
    return [(int(s) * size, int(s) * size + size) for s in sorted(chosen)]


def measure_per_batch(
    model: torch.nn.Module,
    split: ParamSplit,
    schema: Schema,
    data,  # a Dataset, or a ParquetStream (only the picked row ranges are read)
    batches: int = 10,
    batch_size: int = 1024,
    lookahead_lr: float = DEFAULT_LOOKAHEAD_LR,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precond: torch.Tensor | None = None,
    groups: dict[str, list[str]] | None = None,
    holdout: bool = False,
    dist: Dist = SINGLE,
    progress=None,
) -> tuple[list[dict], list[dict]]:
    """→ (per-batch results of :func:`measure_batch`, where each came from). Distributed, process r
    measures batches r, r + world, … and every process gets all of them, in order: the same
    results as one process. ``progress(done, total)``, if given, is called with 0 before this
    process's batches are read and after each one is measured."""
    was_training = model.training
    model.eval()  # no dropout noise: the lookahead must compare like with like
    grads = SharedGradients(model, split, schema, device)
    group_list = build_groups(split, groups, device) if groups else None
    ranges = pick_batches(len(data), batches + 1 if holdout else batches, batch_size, seed)
    if holdout and len(ranges) < 2:
        raise UsageError(
            f"--holdout needs at least two batches of --batch-size {batch_size} rows; the data has {len(data)} rows"
        )
    pairs = list(zip(ranges[:-1], ranges[1:])) if holdout else [(r, None) for r in ranges]
    mine = [k for k in range(len(pairs)) if k % dist.world == dist.rank]
    progress = progress or (lambda done, total: None)
    progress(0, len(mine))
    if isinstance(data, Dataset):

        def batch(rows):
            return data.batch(slice(*rows), device)
    else:  # a ParquetStream: read only the picked row ranges
        picked = {tuple(r): data.rows([r]) for k in mine for r in pairs[k] if r is not None}

        def batch(rows):
            return picked[tuple(rows)].batch(slice(None), device)

    results, measured = [], []
    try:
        for k in mine:
            (start, stop), ev = pairs[k]
            inputs, labels = batch((start, stop))
            eval_batch = batch(ev) if ev else None
            results.append(
                measure_batch(
                    model, split, schema, grads, inputs, labels, lookahead_lr, precond, group_list, eval_batch
                )
            )
            entry = {"rows": [start, stop], "sources": data.describe(start, stop)}
            if ev:
                entry["evaluated_on"] = {"rows": list(ev), "sources": data.describe(*ev)}
            measured.append(entry)
            progress(len(measured), len(mine))
    finally:
        model.train(was_training)
        if grads.tables is not None:  # its lookup recorders off the table modules (a training run's outlive it)
            grads.tables.close()
    if dist.world > 1:
        everything = sorted(dist.gather(list(zip(mine, results, measured))), key=lambda item: item[0])
        results, measured = [r for _, r, _ in everything], [m for _, _, m in everything]
    return results, measured


def measure_full(
    model,
    split,
    schema,
    data,
    batches=10,
    batch_size=1024,
    lookahead_lr=DEFAULT_LOOKAHEAD_LR,
    seed=0,
    device="cpu",
    precond=None,
    groups=None,
    holdout=False,
    normalize_rows=False,
    lookahead="sgd",
    dist: Dist = SINGLE,
    progress=None,
) -> tuple[dict, list[dict]]:
    """→ (the summarised result, the per-batch results for --raw and baseline comparison)."""
    args = (model, split, schema, data, batches, batch_size, lookahead_lr, seed, device, precond, groups, holdout)
    per_batch, measured = measure_per_batch(*args, dist, progress)
    result: dict = {
        "tasks": schema.task_names,
        "lookahead": lookahead,
        "lookahead_lr": lookahead_lr,
        "holdout": holdout,
        "batches": len(per_batch),
        "batches_requested": batches,
        "batch_size": measured[0]["rows"][1] - measured[0]["rows"][0],
    }
    result.update(summarise(per_batch, None, normalize_rows))
    if any(UNTRAINED_MOVED in b for b in per_batch):  # optimizer lookahead: the union over batches
        moved = [b[UNTRAINED_MOVED] for b in per_batch if UNTRAINED_MOVED in b]
        result["untrained_entries_moved"] = int(np.unique(np.concatenate(moved)).size)
    if groups:
        result["modules"] = {
            name: {
                "parameters": params,
                "size": sum(
                    p.numel()
                    for n, p in zip([*split.shared_names, *split.table_names], [*split.shared, *split.tables])
                    if n in set(params)
                ),
                **summarise(per_batch, name, normalize_rows),
            }
            for name, params in groups.items()
        }
    result["measured"] = measured
    return result, per_batch


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
    **options,
) -> dict:
    """Mean and standard error of every matrix over ``batches`` seeded batches of ``data``
    (options: ``precond``, ``groups``, ``holdout``, ``normalize_rows``, ``lookahead``)."""
    return measure_full(model, split, schema, data, batches, batch_size, lookahead_lr, seed, device, **options)[0]
