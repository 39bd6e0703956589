"""Detection metrics as plain functions (the `evaluate` module wraps these)."""

from __future__ import annotations

import numpy as np


def _split(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(int)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    neg, pos = scores[labels == 0], scores[labels == 1]
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("need at least one clean (0) and one triggered (1) example")
    return neg, pos


def auroc(scores, labels) -> float:
    """Probability that a random triggered input scores above a random clean one (ties count one half)."""
    neg, pos = _split(scores, labels)
    # Rank formula (Mann–Whitney U) instead of the O(n·m) pairwise matrix.
    all_scores = np.concatenate([neg, pos])
    order = all_scores.argsort(kind="mergesort")
    ranks = np.empty(len(all_scores))
    ranks[order] = np.arange(1, len(all_scores) + 1)
    for value in np.unique(all_scores):  # average ranks of ties
        tie = all_scores == value
        ranks[tie] = ranks[tie].mean()
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def tpr_at_fpr(scores, labels, fpr: float) -> float:
    """TPR at the threshold that flags at most ``fpr`` of the clean inputs (threshold = a clean-score quantile)."""
    neg, pos = _split(scores, labels)
    k = int(np.floor(fpr * len(neg)))  # number of clean inputs allowed above the threshold
    threshold = np.sort(neg)[::-1][k] if k < len(neg) else -np.inf
    return float((pos > threshold).mean())


def rates(scores, labels, threshold: float) -> dict[str, float]:
    """TPR (detection rate on triggered inputs) and FPR (on clean inputs) when flagging ``score > threshold``."""
    neg, pos = _split(scores, labels)
    return {"tpr": float((pos > threshold).mean()), "fpr": float((neg > threshold).mean())}
