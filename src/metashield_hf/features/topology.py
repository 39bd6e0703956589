"""ψ group ``topology``: 0-dimensional persistent homology, of the clean cloud plus ``x`` and of ``x``'s activation
landscape.

- **Cloud**: in the Rips (single-linkage) filtration of ``clean ∪ {x}``, ``x``'s singleton component dies when its
  first edge appears, i.e. at its distance to the nearest clean point. The clean set's own death times are its
  minimum-spanning-tree edge lengths, so comparing the two says whether ``x`` joins the cloud at a scale the cloud
  itself uses.
- **Landscape**: the standardized activation with units ordered by their clean mean, read as a 1-D function; its
  0-dim sublevel-set persistence summarises how rugged it is (a trigger that drives a group of units adds deep,
  persistent valleys and peaks).

Persistent homology for trojan detection: [Zheng et al. 2021, "Topological Detection of Trojaned Neural
Networks"](https://arxiv.org/abs/2106.06469); 1-D sublevel persistence: Edelsbrunner & Harer, *Computational
Topology* (2010), ch. VII.
"""

from __future__ import annotations

import functools

import torch

from .base import FEATURE_GROUPS, FeatureGroup, log_ratio, rank_in
from .reference import Reference, pairwise_distances

__all__ = ["TopologyGroup", "death_time", "sublevel_persistence_1d"]


def death_time(z: torch.Tensor, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Death time of each row's component in the Rips filtration of ``clean ∪ {x}`` (standardized space).

    Args:
        z: ``(B, D)`` standardized activations.
        ref: the clean reference.

    Returns:
        ``(death (B,), nearest (B,))``: the distance to the nearest clean sample and that sample's index.
    """
    dist = pairwise_distances(z, ref.z)
    death, nearest = dist.min(1)
    return death, nearest


@functools.lru_cache(maxsize=32)
def _floor_log2(n: int) -> torch.Tensor:
    """``floor(log2(i))`` for ``i = 0 … n`` (entry 0 unused)."""
    table = [0] * (n + 1)
    for i in range(2, n + 1):
        table[i] = table[i // 2] + 1
    return torch.tensor(table, dtype=torch.long)


def _sparse_tables(f: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Range-max and range-min sparse tables ``(levels, B, L)`` of ``f``: entry ``[k, b, i]`` covers
    ``f[b, i : i + 2**k]`` (a truncated block near the end; callers only read full blocks)."""
    mx = f.new_empty((levels, *f.shape))
    mn = f.new_empty((levels, *f.shape))
    mx[0] = f
    mn[0] = f
    for k in range(1, levels):
        half = 1 << (k - 1)
        mx[k, :, -half:] = mx[k - 1, :, -half:]
        mn[k, :, -half:] = mn[k - 1, :, -half:]
        torch.maximum(mx[k - 1, :, :-half], mx[k - 1, :, half:], out=mx[k, :, :-half])
        torch.minimum(mn[k - 1, :, :-half], mn[k - 1, :, half:], out=mn[k, :, :-half])
    return mx, mn


def sublevel_persistence_1d(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finite pairs of the 0-dim sublevel-set persistence of each row of ``f (B, L)``, a function on a path graph.

    Ties are broken by position (the usual total order: ``(f[i], i)``), so the pairs are well defined for plateaus
    too. In 1-D every finite pair is born at a local minimum and dies at an interior local maximum ``v`` (the elder
    rule: of the two components that ``v`` joins, the one with the higher minimum dies). ``v``'s two components are
    the stretches up to the previous and the next higher value (its children in the max-Cartesian tree), so the pair
    of ``v`` is ``(max(min left, min right), f[v])``. Previous/next higher values and range minima are found by binary
    lifting on sparse tables, for the interior local maxima only: ``O(B·L·log L)``, vectorised over the batch,
    ``log L`` steps, no sort.

    Returns:
        ``(birth, death, valid)``, each ``(B, P)`` with ``P`` the largest number of pairs in a row: row ``b`` has the
        pairs ``(birth[b, j], death[b, j])`` for which ``valid[b, j]`` (the global minimum's essential class is not
        reported).

    Example:
        ```python
        >>> b, d, ok = sublevel_persistence_1d(torch.tensor([[1.0, 5.0, 0.0, 3.0, 2.0, 6.0]]))
        >>> sorted(zip(b[ok].tolist(), d[ok].tolist()))
        [(1.0, 5.0), (2.0, 3.0)]
        ```
    """
    batch, length = f.shape
    # Under the order (f[i], i), a position j < v is lower than v iff f[j] <= f[v], and j > v iff f[j] < f[v].
    peak = torch.zeros(batch, length, dtype=torch.bool)
    if length >= 3:
        peak[:, 1:-1] = (f[:, :-2] <= f[:, 1:-1]) & (f[:, 2:] < f[:, 1:-1])
    counts = peak.sum(1)
    p = int(counts.max()) if batch else 0
    if p == 0:
        empty = f.new_zeros(batch, 0)
        return empty, empty, torch.zeros(batch, 0, dtype=torch.bool)
    # Compact the peaks of each row into slots 0 … count-1 (the others go to a dump slot p).
    slot = torch.where(peak, peak.long().cumsum(1) - 1, torch.full_like(counts[:, None], p))
    pos = torch.zeros(batch, p + 1, dtype=torch.long).scatter_(1, slot, torch.arange(length).expand(batch, length))
    pos = pos[:, :p]
    fv = torch.gather(f, 1, pos)
    lg = _floor_log2(length)
    levels = int(lg[length]) + 1
    mx, mn = _sparse_tables(f, levels)

    # prev: exclusive bound moved left over blocks that are all lower; nxt: first position not known to be lower.
    prev = pos.clone()
    nxt = pos + 1
    for k in reversed(range(levels)):
        w = 1 << k
        start = prev - w
        move = (start >= 0) & (torch.gather(mx[k], 1, start.clamp_min(0)) <= fv)
        prev = torch.where(move, start, prev)
        move = (nxt <= length - w) & (torch.gather(mx[k], 1, nxt.clamp_max(length - 1)) < fv)
        nxt = torch.where(move, nxt + w, nxt)
    # left child covers [prev, v - 1], right child [v + 1, nxt - 1]; both are non-empty at a peak
    valid = (torch.arange(p)[None, :] < counts[:, None]) & (prev < pos) & (pos + 1 < nxt)
    row_base = torch.arange(batch)[:, None] * length
    pow2 = 2 ** torch.arange(levels)

    def range_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = a.clamp(0, length - 1)
        b = b.clamp(0, length - 1).maximum(a)
        k = lg[b - a + 1]
        base = k * (batch * length) + row_base  # flat index of table k, row b (take() beats 3-tensor indexing)
        return torch.minimum(mn.take(base + a), mn.take(base + (b + 1 - pow2[k]).clamp_min(0)))

    birth = torch.maximum(range_min(prev, pos - 1), range_min(pos + 1, nxt - 1))
    return birth, fv, valid


class TopologyGroup(FeatureGroup):
    """0-dim persistence of ``clean ∪ {x}`` and of ``x``'s activation landscape.

    Features:
        - ``death_max``, ``death_median``: ``log`` of ``x``'s death time (nearest-clean distance in ``z``) over the
          longest / median clean MST edge; ``death_frac``: fraction of clean MST edges shorter than it;
          ``death_local``: ``log`` of it over its nearest clean sample's own nearest-neighbour distance (a local
          scale, as in LOF);
        - on the landscape ``z`` ordered by clean mean: ``landscape_total`` (total persistence / D),
          ``landscape_max`` (``log1p`` of the largest persistence), ``landscape_count`` (pairs with persistence
          > ``threshold`` standard deviations, / D), ``landscape_entropy`` (persistent entropy normalised by the log
          of the number of pairs, in ``[0, 1]``).

    Args:
        threshold: persistence (in clean standard deviations) above which a landscape pair is counted.
    """

    names = (
        "death_max", "death_median", "death_frac", "death_local",
        "landscape_total", "landscape_max", "landscape_count", "landscape_entropy",
    )  # fmt: skip

    def __init__(self, threshold: float = 2.0):
        self.threshold = threshold

    def __call__(
        self, penultimate: torch.Tensor, logits: torch.Tensor, ref: Reference, generator: torch.Generator
    ) -> torch.Tensor:
        z = ref.standardize(penultimate)
        d = z.shape[1]
        death, nearest = death_time(z, ref)
        # float32 halves the memory traffic of the largest step of ψ; |z| <= 1e4 keeps 3 significant decimals
        birth, dth, valid = sublevel_persistence_1d(z.index_select(1, ref.order).float())
        pers = torch.where(valid, dth - birth, torch.zeros_like(dth)).double().clamp_min(0)
        pers = torch.cat([pers, pers.new_zeros(pers.shape[0], 1)], 1)  # a 0 column: rows (or D < 3) with no pairs
        total = pers.sum(1)
        p = pers / total.clamp_min(1e-300)[:, None]
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
        n_pairs = (pers > 0).sum(1).double()
        entropy = torch.where(n_pairs >= 2, -plogp.sum(1) / torch.log(n_pairs.clamp_min(2)), torch.zeros_like(total))
        cols = [
            log_ratio(death, ref.mst.max()), log_ratio(death, ref.mst.quantile(0.5)), rank_in(death, ref.mst),
            log_ratio(death, ref.nn_dist[nearest]),
            total / d, torch.log1p(pers.amax(1)), (pers > self.threshold).double().sum(1) / d, entropy,
        ]  # fmt: skip
        return torch.stack(cols, 1)


FEATURE_GROUPS.register("topology")(TopologyGroup())
