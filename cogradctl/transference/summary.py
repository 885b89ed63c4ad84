"""Summaries of per-batch results: the mean and standard error of every matrix (and the
row-normalised ratios), the change between two checkpoints on the same batches, and the quality
gates on a result.
"""

from __future__ import annotations

import math

import numpy as np

from cogradctl.errors import GateFailed, UsageError
from cogradctl.transference.lookahead import MATRICES, UNTRAINED_MOVED

SIGNIFICANT_SE = 2  # an effect or a change counts when it is more than this many standard errors from 0


def _stack(per_batch: list[dict], key: str, module: str | None = None) -> np.ndarray:
    return np.stack([(b["modules"][module] if module else b)[key] for b in per_batch])


def _stderr(stack: np.ndarray) -> np.ndarray:
    """The standard error of the mean over batches, per entry, over the batches that give the entry
    a value (NaN: a task not observed in that batch, ``lookahead._absent``); 0 with one such batch."""
    n = stack.shape[0]
    if not np.isnan(stack).any():
        return stack.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(stack[0])
    used = _used(stack)
    mean = _mean(stack)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.nansum((stack - mean[None]) ** 2, axis=0) / (used - 1)
        return np.where(used > 1, np.sqrt(var / used), np.where(used == 1, 0.0, np.nan))


def _used(stack: np.ndarray) -> np.ndarray:
    """Per entry, the number of batches that give it a value."""
    return (~np.isnan(stack)).sum(axis=0)


def _mean(stack: np.ndarray) -> np.ndarray:
    """The mean over the batches that give each entry a value (NaN where none does)."""
    used = _used(stack)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(used > 0, np.nansum(stack, axis=0) / np.maximum(used, 1), np.nan)


def _clean(array: np.ndarray) -> list:
    """A nested list with NaN/inf as None (JSON null)."""
    return [_clean(a) for a in array] if array.ndim > 1 else [float(v) if math.isfinite(v) else None for v in array]


def _ratio_of_means(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean(num)/mean(den) per cell and its delta-method standard error (covariance included), over
    the batches where both have a value."""
    both = ~(np.isnan(num) | np.isnan(den))
    num, den = np.where(both, num, np.nan), np.where(both, den, np.nan)
    mn, md = _mean(num), _mean(den)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(md != 0, mn / md, np.nan)
        resid = (num - r[None] * den) / md[None]
    return r, _stderr(resid) if num.shape[0] > 1 else np.zeros_like(r)


def summarise(per_batch: list[dict], module: str | None = None, normalize_rows: bool = False) -> dict:
    """Mean and standard error over batches of every matrix (``"stderr"``). An entry a batch gives
    no value (NaN: its source or target task had no observed row there) is averaged over the other
    batches; ``"batches_used"`` (only when some entry missed a batch) counts them per entry, for
    the losses' matrices (``"transference"``: source and target observed) and the gradients'
    (``"cosine"``: both tasks observed), and an entry no batch gives is None."""
    out, err = {}, {}
    for key in MATRICES:
        stack = _stack(per_batch, key, module)
        out[key] = _clean(_mean(stack))
        err[key] = _clean(_stderr(stack))
    used = {key: _used(_stack(per_batch, key, module)) for key in ("transference", "cosine")}
    if any((u < len(per_batch)).any() for u in used.values()):
        out["batches_used"] = {key: u.astype(int).tolist() for key, u in used.items()}
    if normalize_rows:
        for key in ("transference", "transference_rel"):
            stack = _stack(per_batch, key, module)
            diag = np.einsum("bii->bi", stack)[:, :, None] * np.ones_like(stack)
            r, e = _ratio_of_means(stack, diag)
            out[f"{key}_normalized"] = _clean(r)
            err[f"{key}_normalized"] = _clean(e)
    out["stderr"] = err
    return out


# ---------------------------------------------------------------------------- before / after


def reorder(per_batch: list[dict], order: list[int]) -> list[dict]:
    """Per-batch results with tasks permuted to ``order`` (baseline tasks in the checkpoint's order)."""
    idx = np.array(order)

    def fix(b: dict) -> dict:
        out = {}
        for key, v in b.items():
            if key == "modules":
                out[key] = {m: fix(mb) for m, mb in v.items()}
            elif key == UNTRAINED_MOVED:  # parameter indices, not tasks
                out[key] = v
            elif v.ndim == 2:
                out[key] = v[np.ix_(idx, idx)]
            else:
                out[key] = v[idx]
        return out

    return [fix(b) for b in per_batch]


def compare(after: list[dict], before: list[dict]) -> dict:
    """Change after − before on the same batches: mean, paired standard error, and for each pair of
    Z_rel a verdict: improved / worsened when |change| exceeds SIGNIFICANT_SE (2) standard errors, else
    unchanged (the rule the summary's "no clear effect" uses too)."""
    delta, err = {}, {}
    for key in MATRICES:
        diff = _stack(after, key) - _stack(before, key)
        delta[key] = _clean(_mean(diff))
        err[key] = _clean(_stderr(diff))
    delta["stderr"] = err
    verdict = []
    for row_d, row_e in zip(delta["transference_rel"], err["transference_rel"]):
        verdict.append([_verdict(d, e) for d, e in zip(row_d, row_e)])
    delta["verdict"] = verdict
    return delta


def _verdict(change: float | None, stderr: float | None) -> str:
    if change is None or stderr is None or abs(change) <= SIGNIFICANT_SE * stderr:
        return "unchanged"
    return "improved" if change > 0 else "worsened"


# ---------------------------------------------------------------------------- gates


def check_gates(
    result: dict,
    min_transference: float | None = None,
    max_conflict_rate: float | None = None,
    max_regression: float | None = None,
) -> list[str]:
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
            reasons.append(
                f"--min-transference {min_transference:g}: {tasks[i]} → {tasks[j]} "
                f"Z_rel {v:+.4g} ± {e[i][j]:.2g} is below it{more}"
            )
    if max_conflict_rate is not None:
        c = result["conflict_rate"]
        bad = sorted(
            [(-c[i][j], i, j) for i, j in off if i < j and c[i][j] is not None and c[i][j] > max_conflict_rate]
        )
        if bad:
            v, i, j = bad[0]
            more = f" (and {len(bad) - 1} more pair(s))" if len(bad) > 1 else ""
            reasons.append(
                f"--max-conflict-rate {max_conflict_rate:g}: {tasks[i]} ↔ {tasks[j]} "
                f"conflict rate {-v:.3g} is above it{more}"
            )
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
