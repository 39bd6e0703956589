"""Detection metrics as plain functions (the `evaluate` module ``metrics/backdoor_detection`` wraps these)."""

from __future__ import annotations

from pathlib import Path

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


def auroc_interval(
    scores, labels, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of [`auroc`]: clean and backdoored examples are resampled with replacement
    separately (so every resample has both and keeps the counts), ``resamples`` times.

    For a handful of models (a scan benchmark's 18 held-out cv models) the interval says how far a single swap of two
    models moves the figure, which the point value hides.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    neg, pos = _split(scores, labels)
    rng = np.random.default_rng(seed)
    labels_r = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    values = [auroc(np.r_[rng.choice(neg, len(neg)), rng.choice(pos, len(pos))], labels_r) for _ in range(resamples)]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


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


def accuracy(scores, labels, threshold: float) -> float:
    """Fraction of examples whose decision ``score > threshold`` equals the label (for scans: one row per model)."""
    neg, pos = _split(scores, labels)
    correct = (pos > threshold).sum() + (neg <= threshold).sum()
    return float(correct / (len(neg) + len(pos)))


def fpr_key(fpr: float) -> str:
    """The result key of ``tpr_at_fpr(…, fpr)``: ``0.05`` → ``"tpr@5fpr"`` (as in the meta-evaluation tables)."""
    return f"tpr@{fpr * 100:g}fpr"


def detection_metrics(
    scores, labels, threshold: float | None = None, fprs: tuple[float, ...] = (0.01, 0.05)
) -> dict[str, float]:
    """All the detection metrics at once; the `evaluate` module ``metrics/backdoor_detection`` returns exactly this.

    Inputs: one score per example (higher = more likely triggered) and labels ``1`` = triggered input (or backdoored
    model, for scans), ``0`` = clean.

    Args:
        scores: ``(N,)`` detector scores.
        labels: ``(N,)`` 0/1 labels.
        threshold: the detector's decision threshold (flag ``score > threshold``); ``None`` omits the thresholded
            metrics.
        fprs: clean false-positive rates at which to report the TPR (threshold set on the clean scores themselves).

    Returns:
        ``{"auroc", "tpr@1fpr", "tpr@5fpr"}`` and, with a threshold, ``"tpr"`` (detection rate on triggered inputs),
        ``"fpr"`` (on clean inputs) and ``"accuracy"`` (for scans: over models).

    Example:
        ```python
        >>> detection_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], threshold=0.5)
        {'auroc': 0.75, 'tpr@1fpr': 0.5, 'tpr@5fpr': 0.5, 'tpr': 0.5, 'fpr': 0.0, 'accuracy': 0.75}
        ```
    """
    out = {"auroc": auroc(scores, labels)}
    for fpr in fprs:
        out[fpr_key(fpr)] = tpr_at_fpr(scores, labels, fpr)
    if threshold is not None:
        out.update(rates(scores, labels, threshold))
        out["accuracy"] = accuracy(scores, labels, threshold)
    return out


def metric_path() -> Path:
    """Folder of the `evaluate` metric module shipped in the package (``evaluate.load(str(metric_path()))``)."""
    return Path(__file__).resolve().parents[1] / "metrics" / "backdoor_detection"


def load_metric(**kwargs):
    """``evaluate.load`` of the shipped ``backdoor_detection`` metric: a local folder, so no Hub access at all.

    Example:
        ```python
        >>> metric = load_metric()
        >>> metric.compute(predictions=[0.1, 0.9], references=[0, 1], threshold=0.5)["accuracy"]
        1.0
        ```
    """
    import evaluate

    return evaluate.load(str(metric_path()), **kwargs)
