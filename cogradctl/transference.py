"""Pairwise task transference and gradient conflict (docs/methods.md §1, docs/transference.md).

For each measured batch: one forward and K backward passes (onto the shared parameters only) give
the losses L_j and the shared gradients g_i; then for each source task i one forward with the shared
parameters moved to θ_s − Δ_i (task-specific parameters unchanged, no model copy:
``torch.func.functional_call``) gives every target's lookahead loss L'_{i,j} at once. Δ_i is the
lookahead step: plain SGD, Δ_i = α g_i, or Adam-preconditioned, Δ_i = α g_i / (sqrt(v̂) + ε) with
the second moment v̂ saved in the checkpoint by ``cogradctl train``.

    Z[i, j]     = L_j − L'_{i,j}           absolute loss reduction of target j by a step on source i
    Z_rel[i, j] = 1 − L'_{i,j} / L_j        relative (TAG's inter-task affinity)

Rows are sources, columns targets, the diagonal is each task's own progress. Positive = positive
transfer. Also per batch: cosine of g_i and g_j, whether they conflict (cosine < 0), and gradient
magnitude similarity 2‖g_i‖‖g_j‖/(‖g_i‖²+‖g_j‖²). Reported: the mean over batches and its
standard error. With ``holdout`` the step is taken on one batch and the losses L_j, L'_{i,j} are
measured on the next one. With module groups, every quantity is also computed per group of shared
parameters: the gradient restricted to the group, and a lookahead that moves only that group.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from cogradctl.data import Dataset
from cogradctl.distributed import SINGLE, Dist
from cogradctl.errors import CheckpointError, GateFailed, PluginError, UsageError
from cogradctl.models import ParamSplit
from cogradctl.schema import Schema
from cogradctl.taskgrad import TaskGradients, flat_shared, task_losses, unflatten_shared

# The default SGD lookahead step α (see docs/transference.md, "Choosing the lookahead step"): large
# enough that loss changes are far above float32 rounding of the losses, small enough to stay near
# the first-order regime on standardised inputs (Z ≈ α g_iᵀ g_j).
DEFAULT_LOOKAHEAD_LR = 0.1
MATRICES = ("transference", "transference_rel", "cosine", "conflict_rate", "gms")
# Per-batch quantities kept for --raw besides the matrices.
PER_BATCH_EXTRA = ("loss_before", "loss_after", "grad_norm")
OPTIM_PREFIX = "optim."


# ---------------------------------------------------------------------------- batches


def pick_batches(n_rows: int, batches: int, batch_size: int, seed: int) -> list[tuple[int, int]]:
    """``batches`` non-overlapping contiguous row ranges at seeded random positions, in order."""
    slots = max(n_rows // batch_size, 1)
    size = min(batch_size, n_rows)
    chosen = np.random.default_rng(seed).choice(slots, size=min(batches, slots), replace=False)
    return [(int(s) * size, int(s) * size + size) for s in sorted(chosen)]


# ---------------------------------------------------------------------------- shared-parameter groups


def default_group(name: str) -> str:
    """The default module group of a shared parameter: its top-level module, descending through an
    indexed container only when the indexed element has named children.

    ``input.embedding.weight`` → ``input``; ``experts.3.0.weight`` → ``experts`` (a list of like
    experts is one group); ``levels.0.shared.1.0.bias`` → ``levels.0.shared``;
    ``bottom.2.weight`` → ``bottom``.
    """
    parts = name.split(".")
    path = parts[:-1] or parts  # drop the leaf (weight, bias, …)
    out, k = [path[0]], 1
    while k + 1 < len(path) and path[k].isdigit() and not path[k + 1].isdigit():
        out += path[k : k + 2]
        k += 2
    return ".".join(out)


def shared_groups(model: torch.nn.Module, split: ParamSplit, plugin: str = "model") -> dict[str, list[str]]:
    """{group: [shared parameter names]}: the plugin's ``shared_groups()`` when it defines one (shared
    parameters it leaves out form the group ``(other)``), else :func:`default_group`."""
    shared = list(split.shared_names)
    custom = getattr(model, "shared_groups", None)
    if custom is None:
        groups: dict[str, list[str]] = {}
        for n in shared:
            groups.setdefault(default_group(n), []).append(n)
        return groups
    given = custom()
    if not isinstance(given, dict) or not all(isinstance(v, (list, tuple)) for v in given.values()):
        raise PluginError(f"model plugin '{plugin}': shared_groups() must return {{group: [parameter names]}}")
    known, seen, groups = set(shared), {}, {}
    for group, names in given.items():
        for n in names:
            if n not in known:
                raise PluginError(f"model plugin '{plugin}': shared_groups() puts '{n}' in group '{group}', but it is not a shared parameter")
            if n in seen:
                raise PluginError(f"model plugin '{plugin}': shared_groups() puts '{n}' in groups '{seen[n]}' and '{group}'")
            seen[n] = group
        if names:
            groups[str(group)] = [n for n in shared if n in set(names)]  # keep the model's order
    rest = [n for n in shared if n not in seen]
    if rest:
        groups["(other)"] = rest
    return groups


@dataclass
class Group:
    name: str
    params: list[str]
    index: torch.Tensor  # positions of the group's entries in the flat P-vector
    size: int


def _groups(split: ParamSplit, spec: dict[str, list[str]], device) -> list[Group]:
    offsets, offset = {}, 0
    for n, p in zip(split.shared_names, split.shared):
        offsets[n] = (offset, offset + p.numel())
        offset += p.numel()
    out = []
    for name, params in spec.items():
        index = torch.cat([torch.arange(*offsets[n], device=device) for n in params])
        out.append(Group(name, list(params), index, int(index.numel())))
    return out


# ---------------------------------------------------------------------------- gradients, lookahead


def SharedGradients(model: torch.nn.Module, split: ParamSplit, schema: Schema, device: torch.device | str = "cpu") -> TaskGradients:
    """For one batch: the K losses and the K×P matrix of task gradients on the shared parameters only
    (one forward, K backward passes; the graph is freed by the last one)."""
    return TaskGradients(model, split, schema, device, own=False)


def adam_preconditioner(extra: dict[str, torch.Tensor], history: list[dict], split: ParamSplit, source: str):
    """→ (P-vector 1/(sqrt(v̂)+ε) over the shared parameters, the training lr, info dict) from the
    Adam state ``cogradctl train`` saves; CheckpointError (exit 2) when the checkpoint has none."""
    missing = [n for n in split.shared_names if f"{OPTIM_PREFIX}exp_avg_sq.{n}" not in extra]
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
    parts = []
    steps = set()
    for n, p in zip(split.shared_names, split.shared):
        v = extra[f"{OPTIM_PREFIX}exp_avg_sq.{n}"].to(device=p.device, dtype=torch.float64).reshape(-1)
        step = float(extra.get(f"{OPTIM_PREFIX}step.{n}", torch.tensor(1.0)).reshape(-1)[0])
        steps.add(step)
        v_hat = v / (1.0 - beta2 ** max(step, 1.0))
        parts.append(1.0 / (v_hat.sqrt() + eps))
    precond = torch.cat(parts).to(split.shared[0].dtype)
    return precond, lr, {"beta2": beta2, "eps": eps, "step": max(steps) if steps else 0, "lr": lr}


def _matrices(before: torch.Tensor, after: torch.Tensor, g: torch.Tensor) -> dict[str, np.ndarray]:
    """The K×K matrices of one batch from base losses (K), lookahead losses (K×K) and gradients."""
    gd = g.double()
    gram = gd @ gd.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(norms, norms)
    cosine = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    sq = norms[:, None] ** 2 + norms[None, :] ** 2
    gms = torch.where(sq > 0, 2 * denom / sq.clamp_min(1e-300), torch.zeros_like(sq))
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
    ``taskgrad.TaskGradients``); ``precond`` scales the SGD step elementwise (Adam lookahead);
    ``eval_batch`` = (inputs, labels) of the batch the losses are measured on (holdout), default
    the step batch.
    """
    losses, g, _ = grads(inputs, labels)
    step = lookahead_lr * g if precond is None else lookahead_lr * g * precond
    k = len(schema.tasks)
    x, y = eval_batch if eval_batch is not None else (inputs, labels)
    with torch.no_grad():
        before = losses.double() if eval_batch is None else task_losses(model(x), y, schema).double()
        base = flat_shared(split)
        after = torch.empty(k, k, dtype=torch.float64, device=before.device)
        for i in range(k):
            after[i] = task_losses(functional_call(model, unflatten_shared(split, base - step[i]), (x,)), y, schema).double()
        out = _matrices(before, after, g)
        if groups:
            out["modules"] = {}
            params = dict(zip(split.shared_names, split.shared))
            for grp in groups:
                moved = torch.empty(k, k, dtype=torch.float64, device=before.device)
                for i in range(k):
                    local = step[i].index_select(0, grp.index)
                    chunks = torch.split(local, [params[n].numel() for n in grp.params])
                    stepped = {n: params[n].detach() - c.view_as(params[n]) for n, c in zip(grp.params, chunks)}
                    moved[i] = task_losses(functional_call(model, stepped, (x,)), y, schema).double()
                out["modules"][grp.name] = _matrices(before, moved, g.index_select(1, grp.index))
    return out


# ---------------------------------------------------------------------------- measurement


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
) -> tuple[list[dict], list[dict]]:
    """→ (per-batch results of :func:`measure_batch`, where each came from). Distributed, process r
    measures batches r, r + world, … and every process gets all of them, in order: the same
    results as one process."""
    was_training = model.training
    model.eval()  # no dropout noise: the lookahead must compare like with like
    grads = SharedGradients(model, split, schema, device)
    group_list = _groups(split, groups, device) if groups else None
    ranges = pick_batches(len(data), batches + 1 if holdout else batches, batch_size, seed)
    if holdout and len(ranges) < 2:
        raise UsageError(f"--holdout needs at least two batches of --batch-size {batch_size} rows; the data has {len(data)} rows")
    pairs = list(zip(ranges[:-1], ranges[1:])) if holdout else [(r, None) for r in ranges]
    mine = [k for k in range(len(pairs)) if k % dist.world == dist.rank]
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
            results.append(measure_batch(model, split, schema, grads, inputs, labels, lookahead_lr, precond, group_list, eval_batch))
            entry = {"rows": [start, stop], "sources": data.describe(start, stop)}
            if ev:
                entry["evaluated_on"] = {"rows": list(ev), "sources": data.describe(*ev)}
            measured.append(entry)
    finally:
        model.train(was_training)
    if dist.world > 1:
        everything = sorted(dist.gather(list(zip(mine, results, measured))), key=lambda item: item[0])
        results, measured = [r for _, r, _ in everything], [m for _, _, m in everything]
    return results, measured


def _stack(per_batch: list[dict], key: str, module: str | None = None) -> np.ndarray:
    return np.stack([(b["modules"][module] if module else b)[key] for b in per_batch])


def _stderr(stack: np.ndarray) -> np.ndarray:
    n = stack.shape[0]
    return stack.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(stack[0])


def _clean(array: np.ndarray) -> list:
    """A nested list with NaN/inf as None (JSON null)."""
    return [_clean(a) for a in array] if array.ndim > 1 else [float(v) if math.isfinite(v) else None for v in array]


def _ratio_of_means(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean(num)/mean(den) per cell and its delta-method standard error (covariance included)."""
    mn, md = num.mean(axis=0), den.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(md != 0, mn / md, np.nan)
        resid = (num - r[None] * den) / md[None]
    return r, _stderr(resid) if num.shape[0] > 1 else np.zeros_like(r)


def summarise(per_batch: list[dict], module: str | None = None, normalize_rows: bool = False) -> dict:
    out, err = {}, {}
    for key in MATRICES:
        stack = _stack(per_batch, key, module)
        out[key] = _clean(stack.mean(axis=0))
        err[key] = _clean(_stderr(stack))
    if normalize_rows:
        for key in ("transference", "transference_rel"):
            stack = _stack(per_batch, key, module)
            diag = np.einsum("bii->bi", stack)[:, :, None] * np.ones_like(stack)
            r, e = _ratio_of_means(stack, diag)
            out[f"{key}_normalized"] = _clean(r)
            err[f"{key}_normalized"] = _clean(e)
    out["stderr"] = err
    return out


def measure_full(
    model, split, schema, data, batches=10, batch_size=1024, lookahead_lr=DEFAULT_LOOKAHEAD_LR, seed=0, device="cpu",
    precond=None, groups=None, holdout=False, normalize_rows=False, lookahead="sgd", dist: Dist = SINGLE,
) -> tuple[dict, list[dict]]:
    """→ (the summarised result, the per-batch results for --raw and baseline comparison)."""
    per_batch, measured = measure_per_batch(model, split, schema, data, batches, batch_size, lookahead_lr, seed, device, precond, groups, holdout, dist)
    result: dict = {
        "tasks": schema.task_names,
        "lookahead": lookahead,
        "lookahead_lr": lookahead_lr,
        "holdout": holdout,
        "batches": len(per_batch),
        "batch_size": measured[0]["rows"][1] - measured[0]["rows"][0],
    }
    result.update(summarise(per_batch, None, normalize_rows))
    if groups:
        result["modules"] = {
            name: {"parameters": params, "size": sum(p.numel() for n, p in zip(split.shared_names, split.shared) if n in set(params)),
                   **summarise(per_batch, name, normalize_rows)}
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


# ---------------------------------------------------------------------------- before / after


def reorder(per_batch: list[dict], order: list[int]) -> list[dict]:
    """Per-batch results with tasks permuted to ``order`` (baseline tasks in the checkpoint's order)."""
    idx = np.array(order)

    def fix(b: dict) -> dict:
        out = {}
        for key, v in b.items():
            if key == "modules":
                out[key] = {m: fix(mb) for m, mb in v.items()}
            elif v.ndim == 2:
                out[key] = v[np.ix_(idx, idx)]
            else:
                out[key] = v[idx]
        return out

    return [fix(b) for b in per_batch]


def compare(after: list[dict], before: list[dict]) -> dict:
    """Change after − before on the same batches: mean, paired standard error, and for each pair of
    Z_rel a verdict: improved / worsened when |change| exceeds its standard error, else unchanged."""
    delta, err = {}, {}
    for key in MATRICES:
        diff = _stack(after, key) - _stack(before, key)
        delta[key] = _clean(diff.mean(axis=0))
        err[key] = _clean(_stderr(diff))
    delta["stderr"] = err
    verdict = []
    for row_d, row_e in zip(delta["transference_rel"], err["transference_rel"]):
        verdict.append(["improved" if d > e and d > 0 else "worsened" if -d > e and d < 0 else "unchanged" for d, e in zip(row_d, row_e)])
    delta["verdict"] = verdict
    return delta


# ---------------------------------------------------------------------------- gates


def check_gates(result: dict, min_transference: float | None = None, max_conflict_rate: float | None = None, max_regression: float | None = None) -> list[str]:
    """One reason per failed gate (empty: all pass), each naming the worst pair and its numbers."""
    tasks, k = result["tasks"], len(result["tasks"])
    off = [(i, j) for i in range(k) for j in range(k) if i != j]
    reasons = []
    if min_transference is not None:
        z, e = result["transference_rel"], result["stderr"]["transference_rel"]
        bad = sorted([(z[i][j], i, j) for i, j in off if z[i][j] is not None and z[i][j] < min_transference])
        if bad:
            v, i, j = bad[0]
            more = f" (and {len(bad) - 1} more pair(s))" if len(bad) > 1 else ""
            reasons.append(f"--min-transference {min_transference:g}: {tasks[i]} → {tasks[j]} Z_rel {v:+.4g} ± {e[i][j]:.2g} is below it{more}")
    if max_conflict_rate is not None:
        c = result["conflict_rate"]
        bad = sorted([(-c[i][j], i, j) for i, j in off if i < j and c[i][j] > max_conflict_rate])
        if bad:
            v, i, j = bad[0]
            more = f" (and {len(bad) - 1} more pair(s))" if len(bad) > 1 else ""
            reasons.append(f"--max-conflict-rate {max_conflict_rate:g}: {tasks[i]} ↔ {tasks[j]} conflict rate {-v:.3g} is above it{more}")
    if max_regression is not None:
        if "delta" not in result:
            raise UsageError("--max-regression needs --baseline BEFORE.safetensors")
        d, e = result["delta"]["transference_rel"], result["delta"]["stderr"]["transference_rel"]
        bad = sorted([(d[i][j], i, j) for i, j in off if d[i][j] is not None and -d[i][j] > max_regression])
        if bad:
            v, i, j = bad[0]
            b, a = result["baseline"]["transference_rel"][i][j], result["transference_rel"][i][j]
            more = f" (and {len(bad) - 1} more pair(s))" if len(bad) > 1 else ""
            reasons.append(
                f"--max-regression {max_regression:g}: {tasks[i]} → {tasks[j]} Z_rel fell from {b:+.4g} to {a:+.4g} "
                f"(change {v:+.4g} ± {e[i][j]:.2g}){more}"
            )
    return reasons


def gate(result: dict, **thresholds) -> None:
    reasons = check_gates(result, **thresholds)
    if reasons:
        raise GateFailed("quality gate failed: " + "; ".join(reasons))


# ---------------------------------------------------------------------------- raw per-batch table


def raw_table(tasks: list[str], runs: list[tuple[str, list[dict], list[dict]]]):
    """A pyarrow table, one row per (checkpoint role, module, batch, source, target) — every ordered
    pair including the diagonal (a task's own progress), so K×K rows per batch and module."""
    import pyarrow as pa

    cols: dict[str, list] = {k: [] for k in (
        "checkpoint", "module", "batch", "step_rows_start", "step_rows_end", "eval_rows_start", "eval_rows_end",
        "source", "target", "loss_before", "loss_after", *MATRICES[:2], "cosine", "conflict", "gms",
        "grad_norm_source", "grad_norm_target",
    )}
    k = len(tasks)
    for role, per_batch, measured in runs:
        modules = [None] + sorted(per_batch[0].get("modules", {})) if per_batch else [None]
        for module in modules:
            for b, (res, where) in enumerate(zip(per_batch, measured)):
                r = res["modules"][module] if module else res
                ev = where.get("evaluated_on", where)["rows"]
                for i in range(k):
                    for j in range(k):
                        cols["checkpoint"].append(role)
                        cols["module"].append(module or "*")
                        cols["batch"].append(b)
                        cols["step_rows_start"].append(where["rows"][0])
                        cols["step_rows_end"].append(where["rows"][1])
                        cols["eval_rows_start"].append(ev[0])
                        cols["eval_rows_end"].append(ev[1])
                        cols["source"].append(tasks[i])
                        cols["target"].append(tasks[j])
                        cols["loss_before"].append(float(r["loss_before"][j]))
                        cols["loss_after"].append(float(r["loss_after"][i, j]))
                        cols["transference"].append(float(r["transference"][i, j]))
                        cols["transference_rel"].append(float(r["transference_rel"][i, j]))
                        cols["cosine"].append(float(r["cosine"][i, j]))
                        cols["conflict"].append(bool(r["conflict_rate"][i, j] > 0))
                        cols["gms"].append(float(r["gms"][i, j]))
                        cols["grad_norm_source"].append(float(r["grad_norm"][i]))
                        cols["grad_norm_target"].append(float(r["grad_norm"][j]))
    return pa.table(cols)


def write_raw(table, path) -> None:
    import pyarrow.parquet as pq

    from cogradctl.checkpoint import atomic_write_bytes

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(Path(path), sink.getvalue())
