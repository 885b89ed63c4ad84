"""Paired t intervals and verdicts, LibMTL's Δm%, per-cell summaries, Spearman's ρ and its permutation p."""

from __future__ import annotations

import itertools
import math
import statistics

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def paired(a: dict, b: dict) -> dict | None:
    """a − b over the seeds both have: mean, 95 % t interval, verdict (None under 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return None
    mean = statistics.fmean(d)
    half = (T975[len(d) - 2] if len(d) <= 31 else 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    lo, hi = mean - half, mean + half
    verdict = "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"
    return {"n": len(d), "mean": mean, "lo": lo, "hi": hi, "verdict": verdict}


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def delta_m(test: dict, single: dict) -> float:
    """LibMTL's Δm% for AUC (higher is better): mean over tasks of (M_t − S_t) / S_t × 100."""
    return statistics.fmean((test[t] - single[t]) / single[t] * 100 for t in single)


def summarize(proto: dict, tasks: list[str]) -> dict:
    """Per method: seeds done, per-task test AUC, Δm% per seed (None without every single-task
    model), mean AUC per seed, and the paired differences against ew."""
    complete = all(proto["single"].get(t) for t in tasks)
    ref = {t: mean_sd(r["test"][t] for r in proto["single"][t].values())[0] for t in tasks} if complete else None
    rows = {}
    for m, runs in proto["runs"].items():
        if not runs:
            continue
        rows[m] = {
            "n": len(runs),
            "auc": {t: mean_sd(r["test"][t] for r in runs.values()) for t in tasks},
            "valid": mean_sd(statistics.fmean(r["valid"][t] for t in tasks) for r in runs.values()),
            "mean": {s: statistics.fmean(r["test"][t] for t in tasks) for s, r in runs.items()},
            "dm": {s: delta_m(r["test"], ref) for s, r in runs.items()} if ref else None,
        }
    ew = rows.get("ew")
    for row in rows.values():
        row["vs_ew_dm"] = paired(row["dm"], ew["dm"]) if ew and row["dm"] and ew["dm"] else None
        row["vs_ew_auc"] = paired(row["mean"], ew["mean"]) if ew else None
    return {"ref": ref, "rows": rows}


def measured(m: dict) -> dict:
    """Off-diagonal means: transference ratio Z_rel[i][j] / Z_rel[i][i], cosine, conflict rate."""
    z, k = m["transference_rel"], len(m["tasks"])
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    ratio = [z[i][j] / z[i][i] for i, j in pairs if z[i][i]]
    return {
        "ratio": statistics.fmean(ratio) if ratio else float("nan"),
        "cosine": statistics.fmean(m["cosine"][i][j] for i, j in pairs),
        "conflict": statistics.fmean(m["conflict_rate"][i][j] for i, j in pairs),
    }


def spearman_p(x: list[float], y: list[float]) -> float | None:
    """Two-sided permutation p-value of Spearman's ρ: the share of orderings of y whose |ρ| reaches
    the observed one (every ordering up to 8 points, else 20 000 drawn with a fixed seed)."""
    observed = spearman(x, y)
    if observed is None:
        return None
    import random

    if len(y) <= 8:
        perms = itertools.permutations(y)
    else:
        rng = random.Random(0)
        perms = (rng.sample(y, len(y)) for _ in range(20000))
    hits = total = 0
    for perm in perms:
        r = spearman(x, list(perm))
        hits += r is not None and abs(r) >= abs(observed) - 1e-12
        total += 1
    return hits / total


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 points."""
    if len(x) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for _, group in itertools.groupby(order, key=lambda i: v[i]):
            group = list(group)
            for i in group:
                r[i] = statistics.fmean(order.index(g) for g in group) + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None
