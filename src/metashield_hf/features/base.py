"""The feature-group registry, the group base class and small numeric helpers shared by the groups.

Every helper works in float64: activations of real models span 1e-8 … 1e6, and ψ must stay finite for all of them.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from .reference import Reference

__all__ = ["FEATURE_GROUPS", "FeatureGroup", "group_seed", "log_ratio", "rank_in", "safe_div", "width_norm"]

# A ratio's denominator is floored at this fraction of itself plus an absolute floor, so that a ratio of two zeros is
# 1 (log 0) and a ratio against zero is large but finite.
_REL_EPS = 1e-6
_ABS_EPS = 1e-30


class FeatureGroup:
    """Base class of a ψ feature group: one activation batch, seen against the clean reference, → fixed-width features.

    A group sets ``names`` (its feature names, in output order) and implements ``__call__``. Groups are registered as
    *instances* in [`FEATURE_GROUPS`] under a lower_snake_case name; ``"group.name"`` is the full feature name.

    Contract (tested for every registered group):
        - output ``(B, len(names))`` float64, finite for every finite input (constant, zero, huge, tiny activations);
        - width-free: the same features for any activation width ``D`` and any number of classes ``C``;
        - vectorised over the batch, and row ``i`` of the output depends only on row ``i`` of the input (so ψ of an
          input does not depend on the batch it came in);
        - randomness only from ``generator`` (the same seed gives the same features).

    Example:
        ```python
        >>> from metashield_hf.features import FEATURE_GROUPS, FeatureGroup
        >>> class Norm(FeatureGroup):
        ...     names = ("l2",)
        ...     def __call__(self, penultimate, logits, ref, generator):
        ...         z = ref.standardize(penultimate)
        ...         return (z.norm(dim=1, keepdim=True) / z.shape[1] ** 0.5).double()
        >>> _ = FEATURE_GROUPS.register("my_norm")(Norm())
        ```
    """

    names: tuple[str, ...] = ()

    def __call__(
        self, penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference, generator: torch.Generator
    ) -> torch.Tensor:
        """Args:
            penultimate: ``(B, D)`` float64 activations.
            logits: ``(B, C)`` float64 logits.
            ref: the clean [`Reference`].
            generator: seeded CPU RNG, fresh for this group.

        Returns:
            ``(B, len(self.names))`` float64 tensor.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(names={self.names})"


FEATURE_GROUPS: Registry[FeatureGroup] = Registry("feature_group")


def group_seed(seed: int, name: str) -> int:
    """A per-group seed, so that dropping one group (an ablation) leaves the random draws of the others unchanged."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def safe_div(a: torch.Tensor, b: torch.Tensor | float, fill: float = 0.0, tiny: float = 1e-300) -> torch.Tensor:
    """``a / b`` where ``|b| > tiny``, else ``fill`` (no inf/NaN even in the branch that is not taken)."""
    b = torch.as_tensor(b, dtype=a.dtype)
    ok = b.abs() > tiny
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.full_like(a, fill))


def log_ratio(value: torch.Tensor, reference: torch.Tensor | float) -> torch.Tensor:
    """``log(value / reference)`` for non-negative quantities, finite when either is zero.

    Both sides get the same floor ``1e-6·reference + 1e-30``: equal values give 0, ``0/0`` gives 0, and ``x/0`` is
    large but finite. Log-compressing keeps heavy-tailed ratios on a scale a small MLP can use.
    """
    reference = torch.as_tensor(reference, dtype=value.dtype)
    eps = _REL_EPS * reference.abs() + _ABS_EPS
    return torch.log((value.clamp_min(0) + eps) / (reference.clamp_min(0) + eps))


def rank_in(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mid-rank percentile of each of ``values (B,)`` among ``reference (N,)``, in ``[0, 1]``.

    ``P(ref < v) + ½·P(ref == v)``: a new clean value is uniform on ``[0, 1]`` under exchangeability, whatever the
    distance's scale.
    """
    below = (reference[None, :] < values[:, None]).double().mean(1)
    equal = (reference[None, :] == values[:, None]).double().mean(1)
    return below + 0.5 * equal


def width_norm(d: int) -> float:
    """``sqrt(2 ln D)``, the typical maximum of ``D`` standard normals (≥ 1), used to make maxima width-free."""
    return max(math.sqrt(2.0 * math.log(max(d, 2))), 1.0)
