"""Update-level screening baselines, run on the same rounds as the MetaShield screen.

- [`norm_outliers`]: update L2 norms scored by a robust z-score (median/MAD) over the round — what norm clipping
  and norm-based filtering look at (Sun et al., "Can You Really Backdoor Federated Learning?", 2019,
  https://arxiv.org/abs/1911.07963).
- [`cosine_clusters`]: FLAME's clustering step (Nguyen et al., USENIX Security 2022,
  https://arxiv.org/abs/2101.02281): HDBSCAN on pairwise cosine distances of the updates with a minimum cluster size
  of ``K/2 + 1``; clients outside the majority cluster are flagged. FoolsGold's per-client maximum cosine
  similarity (Fung et al., RAID 2020, https://arxiv.org/abs/1808.04866) is reported as evidence.

Krum, Multi-Krum, Bulyan, trimmed mean and median come from Flower itself (``metashield_hf.fl.flower``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .screen import ClientScore, flatten, robust_z


def _ids(updates: Sequence[Any], client_ids: Sequence[Any] | None) -> list[Any]:
    ids = list(range(len(updates))) if client_ids is None else list(client_ids)
    if len(ids) != len(updates):
        raise ValueError(f"got {len(updates)} updates but {len(ids)} client_ids; pass one id per update")
    return ids


def norm_outliers(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    client_ids: Sequence[Any] | None = None,
    z_threshold: float = 3.5,
) -> list[ClientScore]:
    """Flag updates whose L2 norm is a high outlier of the round (robust z-score > ``z_threshold``).

    Args:
        deltas: one ``name -> tensor`` update ``Δk = local − global`` per client.
        client_ids: ids reported in the scores (default ``0..K-1``).
        z_threshold: flag above this robust z-score (one-sided: only large norms).

    Returns:
        One [`ClientScore`] per update (``score`` = the z-score, ``evidence["update_norm"]``).

    Example:
        ```python
        >>> [s.flagged for s in norm_outliers([{"w": torch.ones(4) * c} for c in (1.0, 1.1, 0.9, 1.0, 9.0)])]
        [False, False, False, False, True]
        ```
    """
    t0 = time.perf_counter()
    ids = _ids(deltas, client_ids)
    norms = np.array([float(np.linalg.norm(flatten(d))) for d in deltas])
    z = robust_z(norms, min_scale=1e-3 * max(float(np.median(norms)), 1e-12)) if len(norms) >= 3 else norms * 0
    sec = (time.perf_counter() - t0) / max(len(deltas), 1)
    return [
        ClientScore(ids[k], k, float(z[k]), bool(z[k] > z_threshold), {"update_norm": float(norms[k])}, sec)
        for k in range(len(deltas))
    ]


def cosine_clusters(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    *,
    client_ids: Sequence[Any] | None = None,
    min_cluster_size: int | None = None,
) -> list[ClientScore]:
    """FLAME-style screening: HDBSCAN on cosine distances; clients outside the largest cluster are flagged.

    Args:
        deltas: one update per client.
        client_ids: ids reported in the scores.
        min_cluster_size: HDBSCAN's minimum cluster size (FLAME: ``K // 2 + 1``, so the benign majority forms one
            cluster).

    Returns:
        One [`ClientScore`] per update: ``score`` = 1 − median cosine similarity to the other clients (larger = more
        isolated), ``flagged`` = not in the majority cluster; ``evidence`` has the cluster label and FoolsGold's
        maximum cosine similarity to any other client.
    """
    from sklearn.cluster import HDBSCAN

    t0 = time.perf_counter()
    ids = _ids(deltas, client_ids)
    k = len(deltas)
    vecs = np.stack([flatten(d) for d in deltas]) if k else np.zeros((0, 1))
    unit = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    cos = np.clip(unit @ unit.T, -1.0, 1.0)
    others = cos + np.diag(np.full(k, np.nan))
    median_cos = np.nanmedian(others, axis=1) if k > 1 else np.ones(k)
    max_cos = np.nanmax(others, axis=1) if k > 1 else np.ones(k)
    if k >= 3:
        size = min_cluster_size or k // 2 + 1
        labels = HDBSCAN(
            metric="precomputed", min_cluster_size=max(2, size), min_samples=1, allow_single_cluster=True, copy=True
        ).fit_predict(np.maximum(1.0 - cos, 0.0))
        clustered = labels[labels >= 0]
        majority = int(np.bincount(clustered).argmax()) if clustered.size else -2
        flagged = labels != majority
    else:
        labels, flagged = np.zeros(k, dtype=int), np.zeros(k, dtype=bool)
    sec = (time.perf_counter() - t0) / max(k, 1)
    return [
        ClientScore(
            ids[i],
            i,
            float(1.0 - median_cos[i]),
            bool(flagged[i]),
            {"cluster": int(labels[i]), "median_cosine": float(median_cos[i]), "max_cosine": float(max_cos[i])},
            sec,
        )  # fmt: skip
        for i in range(k)
    ]
