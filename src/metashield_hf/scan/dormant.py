"""Dormant shortcut weights: how much of each class's head row reads features that clean inputs leave quiet.

A backdoor teaches a classifier a shortcut: features that the trigger switches on, that clean inputs barely use, and
that the target class reads with a large weight. Whatever the trigger's form (a patch, a blend, a sinusoid, a colour
filter, a warp), the poisoned samples form a second cluster inside the target class, and the target's row of the
linear head grows toward those features. The statistic needs no trigger model and no optimisation: one forward pass
of the clean samples, which the scan makes anyway, and the head's weights.

For every class ``c`` the **dormant mass** is

    m_c = sum_j relu(W_cj - mean_k W_kj) / (a_j + floor)

with ``W`` the ``(K, D)`` head weight (its class-specific part: a feature every class reads is no shortcut), and
``a_j`` feature ``j``'s largest absolute penultimate activation over the clean samples divided by the mean of those
maxima over features (features the clean samples drive hard weigh little, quiet ones a lot). The outlier measure is
the robust z-score of ``log m_c`` over classes, as the scan's other per-class statistics
([`dormant_signals`]). It is related to the weight-analysis baselines of the TrojAI rounds and to the dormant-neuron
view of backdoors (Liu et al., "Fine-Pruning", RAID 2018, https://arxiv.org/abs/1805.12185: backdoor neurons are
those clean inputs do not activate).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DORMANT_FLOOR", "dormant_mass"]

#: Added to the relative activation so that a feature no clean sample moves does not get an unbounded weight.
DORMANT_FLOOR = 0.3


def dormant_mass(weight: torch.Tensor, penultimate: torch.Tensor, floor: float = DORMANT_FLOOR) -> np.ndarray:
    """Per-class dormant mass ``(K,)`` of a linear head.

    Args:
        weight: ``(K, D)`` the head's weight (logits = ``penultimate @ weight.T + bias``).
        penultimate: ``(N, D)`` the head's inputs on the clean samples (``N >= 1``).
        floor: added to each feature's relative activation (see the module docstring).

    Returns:
        ``(K,)`` float64, positive.

    Raises:
        ValueError: shapes that do not match, or no clean sample.
    """
    w = weight.detach().float().cpu()
    h = penultimate.detach().float().cpu()
    if w.ndim != 2 or h.ndim != 2 or h.shape[1] != w.shape[1] or not len(h):
        raise ValueError(
            f"dormant_mass needs a (K, D) weight and (N >= 1, D) penultimate activations, got {tuple(w.shape)} and "
            f"{tuple(penultimate.shape)}"
        )
    if floor <= 0:
        raise ValueError(f"floor must be > 0, got {floor}")
    act = h.abs().max(0).values
    rel = act / act.mean().clamp(min=1e-12)
    specific = (w - w.mean(0, keepdim=True)).clamp(min=0.0)
    mass = (specific / (rel + floor)).sum(1).double().numpy()
    return np.maximum(mass, 1e-12)
