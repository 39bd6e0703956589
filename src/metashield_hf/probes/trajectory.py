"""Probe ``trajectory``: how an input's path through the layers compares with the clean samples' (TED-like).

TED ([Mo et al., S&P 2024, "Robust Backdoor Detection for Deep Learning via Topological Evolution Dynamics"](
https://arxiv.org/abs/2312.02673)): at each layer, rank the clean samples by their distance to the input and note
where the first one that the model puts in the input's predicted class comes. A clean input sits among its class from
early layers on; a triggered one starts among its true class and jumps to the target class late, so its rank
trajectory is an outlier among the clean samples' own (leave-one-out) trajectories.

Reads the pooled block activations of the ordinary forward pass (``adapter(inputs, layers=True)``): no extra pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ..targets.base import TargetOutput
from .base import PROBES, Probe

__all__ = ["Trajectory", "layer_ranks"]

# Floor of the per-layer spread of the clean trajectories, so that a layer where every clean sample has rank 0 does
# not turn a rank of 0.1 into an infinite outlier score.
_MIN_STD = 0.05


def layer_ranks(
    query: list[torch.Tensor],
    query_pred: torch.Tensor,
    support: list[torch.Tensor],
    support_pred: torch.Tensor,
    *,
    leave_one_out: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the normalised rank of the nearest same-class clean sample, and the log nearest-neighbour distance.

    Args:
        query: per layer, ``(B, W_l)`` activations of the inputs; query_pred: ``(B,)`` their predicted classes.
        support: per layer, ``(N, W_l)`` clean activations; support_pred: ``(N,)`` their predicted classes.
        leave_one_out: the query is the support itself (row ``i`` never counts itself as a neighbour).

    Returns:
        ``ranks (B, L)`` in ``[0, 1]`` (0: the nearest clean sample is of the input's class; 1: no clean sample of that
        class) and ``log_dist (B, L)``, the log distance to the nearest clean sample.
    """
    b, n = len(query_pred), len(support_pred)
    ranks, dists = np.ones((b, len(query))), np.zeros((b, len(query)))
    same = (query_pred[:, None] == support_pred[None, :]).numpy()
    for layer, (q, s) in enumerate(zip(query, support, strict=True)):
        d = torch.cdist(q.double(), s.double()).numpy()
        if leave_one_out:
            np.fill_diagonal(d, np.inf)
        order = np.argsort(d, axis=1, kind="stable")
        hits = np.take_along_axis(same, order, axis=1)
        if leave_one_out:  # the sample itself sorts last (inf): never a hit
            hits[:, -1] = False
        candidates = n - 1 if leave_one_out else n
        first = np.where(hits.any(1), hits.argmax(1), candidates)
        ranks[:, layer] = first / max(candidates, 1)
        dists[:, layer] = np.log(np.sort(d, axis=1)[:, 0] + 1e-12)
    return ranks, dists


@PROBES.register("trajectory")
class Trajectory(Probe):
    """The layer trajectory against the clean samples' leave-one-out trajectories, as fixed-length statistics.

    Statistics (any number of layers ``L`` and widths): ``ted`` (mean squared z-score of the rank trajectory against
    the clean ones, TED's outlier score), ``dist_z`` (the same for the log nearest-neighbour distances), ``rank_mean``,
    ``rank_max``, ``rank_drop`` (early-half minus late-half mean rank: a late jump into the predicted class),
    ``dist_last_z`` (the z-score of the last layer's distance).
    """

    name = "trajectory"
    names = ("ted", "dist_z", "rank_mean", "rank_max", "rank_drop", "dist_last_z")
    min_passes = 0
    default_passes = 0
    needs_layers = True

    def _fit(self, support_items: list, support_out: TargetOutput) -> None:
        if not support_out.layers:
            raise ValueError("the trajectory probe needs the layer activations: run the support with layers=True")
        if len(support_out) < 3:
            raise ValueError("the trajectory probe needs at least 3 clean samples (leave-one-out trajectories)")
        self.layers = [x.float() for x in support_out.layers]
        self.pred = support_out.logits.argmax(1)
        ranks, dists = layer_ranks(self.layers, self.pred, self.layers, self.pred, leave_one_out=True)
        self.rank_mu, self.rank_sd = ranks.mean(0), np.maximum(ranks.std(0), _MIN_STD)
        self.dist_mu, self.dist_sd = dists.mean(0), np.maximum(dists.std(0), _MIN_STD)
        self._support = self._summarise(ranks, dists)

    def _summarise(self, ranks: np.ndarray, dists: np.ndarray) -> np.ndarray:
        rz = (ranks - self.rank_mu) / self.rank_sd
        dz = (dists - self.dist_mu) / self.dist_sd
        half = max(ranks.shape[1] // 2, 1)
        drop = ranks[:, :half].mean(1) - ranks[:, half:].mean(1) if ranks.shape[1] > 1 else np.zeros(len(ranks))
        return np.stack([(rz**2).mean(1), (dz**2).mean(1), ranks.mean(1), ranks.max(1), drop, dz[:, -1]], 1)

    def _statistics(self, items: list, out: TargetOutput, exclude) -> np.ndarray:
        if len(out.layers) != len(self.layers):
            raise ValueError(
                f"the inputs have {len(out.layers)} layer activations, the clean samples {len(self.layers)}; run both "
                "with layers=True through the same adapter"
            )
        ranks, dists = layer_ranks([x.float() for x in out.layers], out.logits.argmax(1), self.layers, self.pred)
        return self._summarise(ranks, dists)
