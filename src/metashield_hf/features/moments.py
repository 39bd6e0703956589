"""ψ group ``moments``: the shape of one activation vector, standardized against the clean set.

The ``D`` z-scores of one input are treated as a sample and summarised by width-free statistics. A trigger typically
makes a few units fire far outside their clean range (heavy tails: kurtosis, max/mean, extreme fraction) or shifts
many units together (mean, quantiles) — the signals behind activation-based defences such as
[Spectral Signatures (Tran et al. 2018)](https://arxiv.org/abs/1811.00636) and
[Activation Clustering (Chen et al. 2018)](https://arxiv.org/abs/1811.03728), here per input and width-free.
"""

from __future__ import annotations

import torch

from .base import FEATURE_GROUPS, FeatureGroup, safe_div, width_norm
from .reference import Reference

__all__ = ["MomentsGroup", "standardized_moments"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def standardized_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise mean, population variance, skewness and excess kurtosis of ``x (B, D)``.

    Same conventions as ``scipy.stats.skew`` / ``scipy.stats.kurtosis`` with their defaults (biased, Fisher), except
    that a constant row gives skewness and kurtosis 0 instead of NaN.

    Returns:
        four ``(B,)`` float64 tensors.
    """
    x = x.double()
    mean = x.mean(1)
    c = x - mean[:, None]
    c2 = c * c
    m2 = c2.mean(1)
    m3 = (c2 * c).mean(1)
    m4 = (c2 * c2).mean(1)
    # Relative test: a row of 1e6s with float noise is constant, not heavy-tailed.
    constant = m2 <= 1e-24 * (1.0 + mean * mean)
    skew = torch.where(constant, torch.zeros_like(m2), safe_div(m3, m2.clamp_min(1e-300) ** 1.5))
    kurt = torch.where(constant, torch.zeros_like(m2), safe_div(m4, m2.clamp_min(1e-300) ** 2) - 3.0)
    return mean, m2, skew, kurt


class MomentsGroup(FeatureGroup):
    """Moments and shape of the standardized activation vector.

    Features (``z`` = activation standardized with the clean per-unit mean/std, ``h`` = raw activation):
        - ``mean``, ``log_var`` (``log1p`` of the variance), ``skew``, ``kurt`` (excess) of the ``D`` values of ``z``;
        - ``q05 … q95``: quantiles of ``z``;
        - ``mean_abs``: mean ``|z|``; ``frac_extreme``: fraction of units with ``|z| > 3``;
        - ``max_abs``: ``log1p(max |z|)``; ``max_mean``: ``max|z| / mean|z|`` divided by ``sqrt(2 ln D)`` (the typical
          maximum of D normals), so it does not grow with the width;
        - ``l1_l2``: ``‖z‖₁ / (√D·‖z‖₂)`` ∈ ``[1/√D, 1]`` (1 = spread evenly, small = concentrated on few units);
          ``l1_l2_raw``: the same on ``h``;
        - ``sparsity``: fraction of units with ``|h|`` at most 1% of the clean set's mean ``|h|``.

    Args:
        extreme: ``|z|`` threshold of ``frac_extreme``.
        near_zero: "near zero" for ``sparsity``, as a fraction of the clean mean ``|h|``.
    """

    names = (
        "mean", "log_var", "skew", "kurt", "q05", "q25", "q50", "q75", "q95",
        "mean_abs", "frac_extreme", "max_abs", "max_mean", "l1_l2", "l1_l2_raw", "sparsity",
    )  # fmt: skip

    def __init__(self, extreme: float = 3.0, near_zero: float = 1e-2):
        self.extreme = extreme
        self.near_zero = near_zero

    def __call__(
        self, penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference, generator: torch.Generator
    ) -> torch.Tensor:
        h = penultimate.double()
        z = ref.standardize(h)
        d = z.shape[1]
        mean, var, skew, kurt = standardized_moments(z)
        q = torch.quantile(z, torch.tensor(QUANTILES, dtype=z.dtype), dim=1).T  # (B, 5)
        az = z.abs()
        mean_abs = az.mean(1)
        max_abs = az.amax(1)
        l2 = z.norm(dim=1)
        l1_l2 = safe_div(az.sum(1), l2 * d**0.5, tiny=1e-150)
        ah = h.abs()
        l1_l2_raw = safe_div(ah.sum(1), h.norm(dim=1) * d**0.5, tiny=1e-150)
        sparsity = (ah <= self.near_zero * ref.abs_scale).double().mean(1)
        cols = [
            mean, torch.log1p(var), skew, kurt, *q.unbind(1),
            mean_abs, (az > self.extreme).double().mean(1), torch.log1p(max_abs),
            safe_div(max_abs, mean_abs, tiny=1e-150) / width_norm(d), l1_l2, l1_l2_raw, sparsity,
        ]  # fmt: skip
        return torch.stack(cols, 1)


FEATURE_GROUPS.register("moments")(MomentsGroup())
