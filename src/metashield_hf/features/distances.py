"""ψ group ``distances``: how far one activation lies from the clean reference set.

Three views of "far", each reported on three width-free scales (absolute per-unit, log-ratio to the clean set's own
leave-one-out median, and percentile among the clean set):

- kNN distance in standardized space — [Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest
  Neighbors"](https://arxiv.org/abs/2204.06507);
- cosine distance to the clean centroid (direction, not magnitude);
- shrinkage Mahalanobis distance — [Lee et al. 2018](https://arxiv.org/abs/1807.03888) with the
  [Ledoit–Wolf](https://doi.org/10.1016/S0047-259X(03)00096-4) covariance, which stays invertible with 5 samples in
  768 dimensions.

The clean set's own values are leave-one-out (a sample is not its own neighbour), so a new clean input and a clean
reference sample land on the same scale.
"""

from __future__ import annotations

import torch

from .base import FEATURE_GROUPS, FeatureGroup, log_ratio, rank_in
from .reference import Reference, cosine_distance, pairwise_distances

__all__ = ["DistancesGroup", "knn_distance"]


def knn_distance(z: torch.Tensor, ref: Reference) -> torch.Tensor:
    """Mean distance of standardized rows ``z (B, D)`` to their ``ref.k`` nearest clean samples, ``(B,)``."""
    dist = pairwise_distances(z, ref.z)
    return dist.topk(ref.k, dim=1, largest=False).values.mean(1)


class DistancesGroup(FeatureGroup):
    """Reference distances of the standardized activation.

    Features:
        - ``knn``: ``log1p(d_k / √D)``, ``d_k`` = mean distance to the ``k`` nearest clean samples (in ``z``, where
          two clean samples are about ``√(2D)`` apart); ``knn_ratio``: ``log(d_k / median of the clean
          leave-one-out d_k)`` (≈ 0 inside the cloud, ≫ 0 far outside); ``knn_rank``: percentile among them;
        - ``cos``: ``1 − cos(h, clean centroid)`` on the raw activation; ``cos_ratio``, ``cos_rank`` likewise against
          each clean sample's distance to the centroid of the others;
        - ``maha``: ``log1p(m / D)``, ``m`` = squared Ledoit–Wolf Mahalanobis distance in ``z``; ``maha_ratio``,
          ``maha_rank`` against the clean samples' leave-one-out values.
    """

    names = ("knn", "knn_ratio", "knn_rank", "cos", "cos_ratio", "cos_rank", "maha", "maha_ratio", "maha_rank")

    def __call__(
        self, penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference, generator: torch.Generator
    ) -> torch.Tensor:
        h = penultimate.double()
        z = ref.standardize(h)
        d = z.shape[1]
        knn = knn_distance(z, ref)
        cos = cosine_distance(h, ref.centroid)
        maha = ref.mahalanobis(z)
        cols = [
            torch.log1p(knn / d**0.5), log_ratio(knn, ref.loo_knn.quantile(0.5)), rank_in(knn, ref.loo_knn),
            cos, log_ratio(cos, ref.loo_cos.quantile(0.5)), rank_in(cos, ref.loo_cos),
            torch.log1p(maha / d), log_ratio(maha, ref.loo_maha.quantile(0.5)), rank_in(maha, ref.loo_maha),
        ]  # fmt: skip
        return torch.stack(cols, 1)


FEATURE_GROUPS.register("distances")(DistancesGroup())
