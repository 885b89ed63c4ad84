"""Evaluation metrics, computed exactly in float64 with numpy."""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact ROC AUC, tie-aware: the probability that a random positive outscores a random negative,
    counting ties as one half (the Mann–Whitney U statistic with average ranks). NaN when only one
    class is present.

    >>> auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    >>> auc(np.array([0, 1]), np.array([0.5, 0.5]))
    0.5

    With ``weights`` (row weights w ≥ 0): the weighted Mann–Whitney statistic, each pair of a
    positive i and a negative j counting w_i·w_j (ties one half), over W₊·W₋; NaN when either
    class has no weight. With every weight 1 it is the AUC above.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if weights is not None:
        return _weighted_auc(labels, scores, np.asarray(weights, dtype=np.float64).ravel())
    n_pos = float(labels.sum())
    n_neg = float(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = _midranks(scores)[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _weighted_auc(labels: np.ndarray, scores: np.ndarray, w: np.ndarray) -> float:
    """Σ over (positive i, negative j) of w_i w_j ([s_i > s_j] + ½[s_i = s_j]) / (W₊ W₋), in O(N log N):
    per distinct score, its positives' weight times the negatives' weight below it plus half of
    the negatives' weight at it."""
    pos = labels == 1
    w_pos, w_neg = float(w[pos].sum()), float(w[~pos].sum())
    if w_pos == 0 or w_neg == 0:
        return math.nan
    _, group = np.unique(scores, return_inverse=True)
    neg = np.bincount(group, weights=np.where(pos, 0.0, w))
    pos_at = np.bincount(group, weights=np.where(pos, w, 0.0), minlength=neg.size)
    below = np.cumsum(neg) - neg
    return float((pos_at * (below + 0.5 * neg)).sum() / (w_pos * w_neg))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc_se(labels: np.ndarray, scores: np.ndarray) -> float:
    """DeLong's standard error of the AUC on these rows (DeLong, DeLong & Clarke-Pearson, 1988),
    computed from midranks in O(N log N) (Sun & Xu, 2014). NaN with fewer than two rows of either class.

    Each positive's placement V10 is the fraction of negatives it outscores (ties one half), each
    negative's V01 the fraction of positives that outscore it; both average to the AUC, and
    SE² = var(V10)/m + var(V01)/n for m positives and n negatives (sample variances). It measures
    how much the AUC would move on another sample of the same size: the test split's own noise,
    which a difference between two models must exceed to mean anything.

    >>> round(auc_se(np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])), 4)
    0.1571
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos, neg = scores[labels == 1], scores[labels != 1]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        return math.nan
    ranks = _midranks(np.concatenate([pos, neg]))
    v10 = (ranks[:m] - _midranks(pos)) / n  # negatives below each positive
    v01 = 1.0 - (ranks[m:] - _midranks(neg)) / m  # positives above each negative
    return float(math.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7, weights: np.ndarray | None = None) -> float:
    """Mean binary cross-entropy of probabilities clipped to [eps, 1 - eps] (weighted: Σ w·l / Σ w)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return _mean(-(y * np.log(p) + (1 - y) * np.log1p(-p)), weights)


def mse(labels: np.ndarray, preds: np.ndarray, weights: np.ndarray | None = None) -> float:
    return _mean((np.asarray(preds, np.float64).ravel() - np.asarray(labels, np.float64).ravel()) ** 2, weights)


def mae(labels: np.ndarray, preds: np.ndarray, weights: np.ndarray | None = None) -> float:
    return _mean(np.abs(np.asarray(preds, np.float64).ravel() - np.asarray(labels, np.float64).ravel()), weights)


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    """The mean of ``values``, or their weighted mean Σ w·v / Σ w (NaN when Σ w = 0)."""
    if weights is None:
        return float(np.mean(values))
    w = np.asarray(weights, dtype=np.float64).ravel()
    total = float(w.sum())
    return float((w * values).sum() / total) if total > 0 else math.nan
