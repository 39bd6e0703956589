"""ψ: dimension-agnostic, fixed-length features of one activation seen against a clean reference set.

ψ maps the penultimate activation ``h (D,)`` and logits ``(C,)`` of one input, compared with a few clean samples of
the same model, to ``F`` numbers that mean the same for a 64-d toy CNN and a 768-d BERT: ``F`` depends only on the
feature groups, never on ``D`` or ``C``. Groups are switchable (ablations drop one at a time) and registered in
[`FEATURE_GROUPS`]:

| group | module | what it measures |
|---|---|---|
| ``moments`` | ``moments.py`` | shape of the standardized activation (moments, quantiles, sparsity, L1/L2, max/mean) |
| ``distances`` | ``distances.py`` | kNN, cosine-to-centroid and Ledoit–Wolf Mahalanobis distance to the clean set |
| ``topology`` | ``topology.py`` | 0-dim persistence of clean ∪ {x}, and of the activation landscape |
| ``behaviour`` | ``behaviour.py`` | confidence, entropy, margin, predicted-class frequency, relative to the clean set |
| ``consistency`` | ``consistency.py`` | prediction stability under dropout at the penultimate layer and head-weight noise |

Example:
    ```python
    >>> from metashield_hf.features import build_reference, compute_features, feature_names, loo_features
    >>> ref = build_reference(clean.penultimate, clean.logits, head.weight, head.bias)   # once per adaptation
    >>> psi = compute_features(out.penultimate, out.logits, ref)                        # (B, F)
    >>> psi_clean = loo_features(ref)                                                   # (N, F), leave-one-out
    >>> len(feature_names()) == psi.shape[1]
    True
    ```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import behaviour, consistency, distances, moments, topology  # noqa: F401  (register the groups)
from .base import FEATURE_GROUPS, FeatureGroup, group_seed
from .reference import Reference, build_reference, reference_without

__all__ = [
    "DEFAULT_GROUPS",
    "FEATURE_GROUPS",
    "FeatureGroup",
    "Reference",
    "build_reference",
    "compute_features",
    "feature_names",
    "loo_features",
    "reference_without",
    "resolve_groups",
]

DEFAULT_GROUPS: tuple[str, ...] = ("moments", "distances", "topology", "behaviour", "consistency")


def resolve_groups(groups: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """The group names to compute, in order: ``None`` → [`DEFAULT_GROUPS`]; a single name is accepted.

    Raises:
        KeyError: an unknown group (the message lists the available ones).
        ValueError: an empty or repeated selection.
    """
    if groups is None:
        return DEFAULT_GROUPS
    names = (groups,) if isinstance(groups, str) else tuple(groups)
    if not names:
        raise ValueError(f"no feature groups selected; pick from {FEATURE_GROUPS.list()} or pass None for all")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"feature groups {repeated} are selected more than once in {names}; list each once")
    for name in names:
        FEATURE_GROUPS.get(name)  # KeyError listing the available groups
    return names


def feature_names(groups: Sequence[str] | str | None = None) -> list[str]:
    """``"group.name"`` of every ψ feature, in output order (the layout a detector's config stores).

    Args:
        groups: feature groups (default [`DEFAULT_GROUPS`]).

    Returns:
        ``F`` names.

    Example:
        ```python
        >>> feature_names(["behaviour"])[:2]
        ['behaviour.confidence', 'behaviour.conf_ratio']
        ```
    """
    return [f"{g}.{n}" for g in resolve_groups(groups) for n in FEATURE_GROUPS.get(g).names]


def _check_batch(penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference) -> None:
    for name, t, width, what in (
        ("penultimate", penultimate, ref.width, "D"),
        ("logits", logits, ref.num_classes, "C"),
    ):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor (B, {what}); got {shape} (use x[None] for one input)")
        if t.shape[1] != width:
            raise ValueError(
                f"{name} has width {t.shape[1]} but the clean reference has {what}={width}; "
                "build the reference from the same model and layer"
            )
        bad = ~torch.isfinite(t)
        if bad.any():
            raise ValueError(
                f"{name} has {int(bad.sum())} non-finite values in {int(bad.any(1).sum())} of {t.shape[0]} rows; "
                "ψ of NaN/inf activations would be meaningless (fp16 overflow? load the model in float32)"
            )
    if penultimate.shape[0] != logits.shape[0]:
        raise ValueError(f"penultimate has {penultimate.shape[0]} rows but logits has {logits.shape[0]}")


@torch.no_grad()
def compute_features(
    penultimate: torch.Tensor,
    logits: torch.Tensor,
    ref: Reference,
    groups: Sequence[str] | str | None = None,
    *,
    seed: int = 0,
) -> torch.Tensor:
    """ψ of a batch of activations against the clean reference.

    Row ``i`` depends only on row ``i`` (and ``ref``, ``groups``, ``seed``), so splitting a batch changes nothing.

    Args:
        penultimate: ``(B, D)`` activations at the penultimate layer.
        logits: ``(B, C)`` logits.
        ref: the clean [`Reference`] from [`build_reference`].
        groups: feature groups, in order (default [`DEFAULT_GROUPS`]).
        seed: seed of the random perturbations (same seed → identical ψ). Each group draws from its own generator,
            so dropping a group leaves the others' values unchanged.

    Returns:
        ``(B, F)`` float32, finite; ``F = len(feature_names(groups))`` whatever ``D`` and ``C``.

    Raises:
        ValueError: shapes that do not match the reference, or non-finite inputs.
        KeyError: an unknown group.
    """
    names = resolve_groups(groups)
    _check_batch(penultimate, logits, ref)
    h = penultimate.detach().double().cpu()
    lg = logits.detach().double().cpu()
    b = h.shape[0]
    blocks = []
    for name in names:
        group = FEATURE_GROUPS.get(name)
        if b == 0:
            blocks.append(torch.zeros(0, len(group.names), dtype=torch.float64))
            continue
        out = group(h, lg, ref, torch.Generator().manual_seed(group_seed(seed, name)))
        if tuple(out.shape) != (b, len(group.names)):
            raise RuntimeError(
                f"feature group {name!r} returned shape {tuple(out.shape)}, expected {(b, len(group.names))}"
            )
        blocks.append(out.double())
    feats = torch.cat(blocks, 1).float()
    bad = ~torch.isfinite(feats)
    if bad.any():  # a bug in a group, never the caller's fault: name the feature so it can be fixed
        cols = bad.any(0).nonzero()[:, 0].tolist()
        names_bad = [feature_names(names)[j] for j in cols]
        raise RuntimeError(
            f"non-finite ψ features {names_bad}; please report this with the activations that caused it"
        )
    return feats


@torch.no_grad()
def loo_features(ref: Reference, groups: Sequence[str] | str | None = None, *, seed: int = 0) -> torch.Tensor:
    """Leave-one-out ψ of the clean reference set itself.

    Row ``i`` is ψ of clean sample ``i`` against the reference built without it (``reference_without(ref, i)``), so
    the clean set is scored on the same footing as a new clean input; the detector uses these as its reference
    features and the shield calibrates its threshold on them. Costs ``N`` reference builds (``N ≤ 50`` in practice).

    Args:
        ref: the clean [`Reference`] (at least 3 samples).
        groups: feature groups (default [`DEFAULT_GROUPS`]).
        seed: as in [`compute_features`].

    Returns:
        ``(N, F)`` float32.
    """
    resolve_groups(groups)
    rows = [
        compute_features(
            ref.penultimate[i : i + 1], ref.logits[i : i + 1], reference_without(ref, i), groups, seed=seed
        )
        for i in range(ref.num_samples)
    ]
    return torch.cat(rows)
