"""The deployable inner loop: adapt the detector to one target with only its clean support.

Pseudo-anomalies are made in activation space from the clean support alone (never the model's true trigger), so the
same loop runs at deployment and inside MAML. Written with ``torch.func.functional_call`` so that MAML can
differentiate through it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..features import compute_features
from ..features.reference import Reference

PSEUDO_KINDS = ("class_push", "unit_boost", "noise")


def pseudo_anomalies(ref: Reference, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic pseudo-triggered activations built from the clean support.

    Three domain-agnostic kinds, cycled: ``class_push`` moves an activation along one class's head direction (what a
    trigger that forces a target class does to the penultimate layer), ``unit_boost`` inflates a few random units
    (a trigger feature firing), ``noise`` adds isotropic noise at the clean set's scale.

    Args:
        ref: the clean reference (its penultimate ``(N, D)`` and head weights are used).
        n: how many pseudo-anomalies to make.
        generator: seeded RNG.

    Returns:
        ``(penultimate (n, D), logits (n, C))``.
    """
    h = ref.penultimate
    num, dim = h.shape
    idx = torch.randint(num, (n,), generator=generator)
    base = h[idx].clone()
    scale = h.std(0).mean().clamp_min(1e-6) * dim**0.5  # typical distance between clean activations
    strength = 0.5 + 1.5 * torch.rand(n, 1, generator=generator)
    kind = torch.arange(n) % len(PSEUDO_KINDS)

    w = ref.head_weight if ref.head_weight is not None else torch.randn(2, dim, generator=generator)
    cls = torch.randint(w.shape[0], (n,), generator=generator)
    direction = w[cls] / w[cls].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    pushed = base + strength * scale * direction

    mask = (torch.rand(n, dim, generator=generator) < max(2.0 / dim, 0.05)).float()
    boosted = base + mask * strength * h.std(0).clamp_min(1e-6) * 4.0

    noised = base + strength * scale / dim**0.5 * torch.randn(n, dim, generator=generator)

    out = torch.where((kind == 0)[:, None], pushed, torch.where((kind == 1)[:, None], boosted, noised))
    if ref.head_weight is not None:
        logits = out @ ref.head_weight.T + (ref.head_bias if ref.head_bias is not None else 0.0)
    else:  # no head: keep the clean logits of the source rows
        logits = ref.logits[idx]
    return out, logits


def inner_loop(
    detector: nn.Module,
    params: dict[str, torch.Tensor],
    clean_features: torch.Tensor,
    anomaly_features: torch.Tensor,
    reference_features: torch.Tensor,
    *,
    steps: int,
    lr: float,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """``steps`` gradient steps of BCE (clean 0, pseudo-anomaly 1) on ``params``; returns the adapted params.

    With ``create_graph=True`` the steps stay differentiable (second-order MAML).
    """
    x = torch.cat([clean_features, anomaly_features])
    y = torch.cat([torch.zeros(len(clean_features)), torch.ones(len(anomaly_features))])
    for _ in range(steps):
        out = functional_call(detector, params, (x, reference_features), {"labels": y})
        grads = torch.autograd.grad(out.loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        params = {name: p if g is None else p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
    return params


def make_pseudo_features(ref: Reference, n: int, groups, seed: int) -> torch.Tensor:
    """ψ of ``n`` pseudo-anomalies against ``ref`` (deterministic under ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    pen, logits = pseudo_anomalies(ref, n, g)
    return compute_features(pen, logits, ref, groups, seed=seed)
