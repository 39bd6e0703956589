"""ψ group ``behaviour``: what the classifier says about the input, relative to what it says on clean data.

A trigger forces one class, usually with a confidence and margin beyond the clean inputs' (and the forced class need
not be one the clean set predicts often). Softmax confidence as an anomaly score: [Hendrycks & Gimpel 2017, "A
Baseline for Detecting Misclassified and Out-of-Distribution Examples"](https://arxiv.org/abs/1610.02136).
"""

from __future__ import annotations

import math

import torch

from .base import FEATURE_GROUPS, FeatureGroup, log_ratio, rank_in
from .reference import Reference

__all__ = ["BehaviourGroup", "normalized_entropy", "top2_margin"]


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy divided by ``log C`` (1 for uniform logits, 0 for a one-hot prediction; 0 when ``C = 1``)."""
    c = logits.shape[1]
    if c < 2:
        return torch.zeros(logits.shape[0], dtype=torch.float64)
    logp = logits.double().log_softmax(1)
    ent = -(logp.exp() * logp).sum(1)
    return (ent / math.log(c)).clamp(0.0, 1.0)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit, ``(B,)`` (0 when ``C = 1``)."""
    if logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.float64)
    top = logits.double().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


class BehaviourGroup(FeatureGroup):
    """Output behaviour of the target on the input, relative to the clean set.

    Features:
        - ``confidence``: max softmax probability; ``conf_ratio``: ``log`` of it over the clean mean confidence;
        - ``entropy``: softmax entropy / ``log C``;
        - ``margin``: ``log1p(m / median clean margin)`` with ``m`` = top-1 − top-2 logit (``log 2`` at the clean
          median); ``margin_rank``: percentile of ``m`` among the clean margins;
        - ``pred_freq``: ``log(C · f)`` with ``f`` the (Laplace-smoothed) clean frequency of the input's predicted
          class: > 0 when that class is over-represented on the clean set, < 0 when the clean set rarely predicts it;
        - ``logit_norm``: ``log`` of the logit L2 norm over the clean median.
    """

    names = ("confidence", "conf_ratio", "entropy", "margin", "margin_rank", "pred_freq", "logit_norm")

    def __call__(
        self, penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference, generator: torch.Generator
    ) -> torch.Tensor:
        lg = logits.double()
        c = lg.shape[1]
        conf = lg.softmax(1).amax(1)
        margin = top2_margin(lg)
        pred = lg.argmax(1)
        cols = [
            conf, log_ratio(conf, ref.confidence.mean()), normalized_entropy(lg),
            torch.log1p(margin / (ref.margins.quantile(0.5) + 1e-6 * ref.logit_norm.quantile(0.5) + 1e-30)),
            rank_in(margin, ref.margins), torch.log(c * ref.class_freq[pred]),
            log_ratio(lg.norm(dim=1), ref.logit_norm.quantile(0.5)),
        ]  # fmt: skip
        return torch.stack(cols, 1)


FEATURE_GROUPS.register("behaviour")(BehaviourGroup())
