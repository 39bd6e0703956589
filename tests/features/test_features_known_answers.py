"""Known answers per formula, each from an independent computation (scipy, numpy, a brute-force union-find)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from feature_data import make_activations, make_head, make_model_outputs
from scipy.cluster.hierarchy import linkage
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import cdist

from metashield_hf.features import build_reference, compute_features, feature_names
from metashield_hf.features.moments import QUANTILES, standardized_moments
from metashield_hf.features.topology import death_time, sublevel_persistence_1d


def _col(feats: torch.Tensor, name: str, groups=None) -> torch.Tensor:
    return feats[:, feature_names(groups).index(name)]


def _gaussian_cloud(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---- moments -------------------------------------------------------------------------------------------------------
def test_moments_match_scipy():
    rng = np.random.default_rng(0)
    x = np.stack([rng.gamma(2.0, size=300), rng.standard_t(5, size=300), rng.normal(size=300)])
    mean, var, skew, kurt = standardized_moments(torch.from_numpy(x))
    np.testing.assert_allclose(mean.numpy(), x.mean(1), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), x.var(1), rtol=1e-12)
    np.testing.assert_allclose(skew.numpy(), scipy.stats.skew(x, axis=1), rtol=1e-10)
    np.testing.assert_allclose(kurt.numpy(), scipy.stats.kurtosis(x, axis=1), rtol=1e-10)
    assert skew[0] > 1.0 and kurt[1] > 0.5  # gamma is right-skewed, Student t heavy-tailed
    const = standardized_moments(torch.full((1, 10), 1e6))
    assert [float(v) for v in const[2:]] == [0.0, 0.0]  # scipy gives NaN; ψ must stay finite


def test_moments_group_is_computed_on_the_standardized_vector():
    pen, logits, w, b = make_model_outputs(20, 50, 3)
    ref = build_reference(pen, logits, w, b)
    x = make_activations(4, 50, seed=3)
    x[0, :2] += 10.0  # two units firing hard: heavy tail
    feats = compute_features(x, x @ w.T + b, ref, ["moments"])
    z = ref.standardize(x).numpy()
    np.testing.assert_allclose(_col(feats, "moments.skew", ["moments"]), scipy.stats.skew(z, axis=1), rtol=1e-5)
    np.testing.assert_allclose(_col(feats, "moments.kurt", ["moments"]), scipy.stats.kurtosis(z, axis=1), rtol=1e-5)
    np.testing.assert_allclose(_col(feats, "moments.log_var", ["moments"]), np.log1p(z.var(1)), rtol=1e-5)
    for q in QUANTILES:
        name = f"moments.q{round(100 * q):02d}"
        np.testing.assert_allclose(_col(feats, name, ["moments"]), np.quantile(z, q, axis=1), rtol=1e-5, atol=1e-6)
    l1_l2 = np.abs(z).sum(1) / (np.linalg.norm(z, axis=1) * 50**0.5)
    np.testing.assert_allclose(_col(feats, "moments.l1_l2", ["moments"]), l1_l2, rtol=1e-5)
    kurt = _col(feats, "moments.kurt", ["moments"])
    assert kurt[0] > kurt[1:].max() + 3.0


def test_sparsity_counts_raw_zeros():
    pen = torch.ones(4, 10) + torch.arange(4.0)[:, None]
    ref = build_reference(pen, torch.zeros(4, 2))
    x = torch.ones(2, 10)
    x[0, :3] = 0.0
    x[1, :7] = 1e-5  # below 1% of the clean mean |h| (2.5)
    sparsity = _col(compute_features(x, torch.zeros(2, 2), ref, ["moments"]), "moments.sparsity", ["moments"])
    assert sparsity.tolist() == pytest.approx([0.3, 0.7])


# ---- distances -----------------------------------------------------------------------------------------------------
def test_knn_ratio_inside_is_about_one_and_far_outside_is_large():
    d = 32
    clean = _gaussian_cloud(40, d, seed=1)
    ref = build_reference(clean, torch.zeros(40, 2), k=5)
    inside = _gaussian_cloud(60, d, seed=2)  # fresh draws from the same cloud
    far = _gaussian_cloud(3, d, seed=3) + 8.0
    feats = compute_features(torch.cat([inside, far]), torch.zeros(63, 2), ref, ["distances"])
    ratio = _col(feats, "distances.knn_ratio", ["distances"]).exp()
    assert 0.85 < float(ratio[:60].log().mean().exp()) < 1.15
    assert float(ratio[60:].min()) > 3.0
    rank = _col(feats, "distances.knn_rank", ["distances"])
    assert 0.35 < float(rank[:60].mean()) < 0.65  # honest leave-one-out: a fresh clean point is ~uniform
    assert rank[60:].tolist() == [1.0, 1.0, 1.0]


def test_knn_distance_known_answer():
    clean = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    ref = build_reference(clean, torch.zeros(4, 2), k=2)
    x = torch.tensor([[1.0, 1.0]])
    feats = compute_features(x, torch.zeros(1, 2), ref, ["distances"])
    z = ref.standardize(x)
    dist = (ref.standardize(clean) - z).norm(dim=1).sort().values
    expected = math.log1p(float(dist[:2].mean()) / 2**0.5)
    assert float(_col(feats, "distances.knn", ["distances"])[0]) == pytest.approx(expected, rel=1e-5)


def test_far_point_scores_above_held_out_clean_point():
    pen, logits, w, b = make_model_outputs(31, 48, 4, seed=6)
    ref = build_reference(pen[:30], logits[:30], w, b)
    held_out = pen[30:31]
    direction = torch.randn(1, 48, generator=torch.Generator().manual_seed(1))
    far = pen[:30].mean(0, keepdim=True) + 6.0 * pen[:30].std(0) * direction
    x = torch.cat([held_out, far])
    feats = compute_features(x, x @ w.T + b, ref)
    for name in ("distances.knn_ratio", "distances.maha_ratio", "distances.maha", "topology.death_max",
                 "topology.death_median", "topology.death_local"):  # fmt: skip
        col = _col(feats, name)
        assert col[1] > col[0] + 0.5, (name, col.tolist())
    assert float(_col(feats, "topology.death_frac")[1]) == 1.0


def test_cosine_distance_known_answer():
    clean = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, -0.2]])  # centroid (1, 0)
    ref = build_reference(clean, torch.zeros(3, 2))
    x = torch.tensor([[0.0, 3.0], [2.0, 0.0], [-1.0, 0.0]])
    cos = _col(compute_features(x, torch.zeros(3, 2), ref, ["distances"]), "distances.cos", ["distances"])
    assert cos.tolist() == pytest.approx([1.0, 0.0, 2.0], abs=1e-6)


# ---- topology ------------------------------------------------------------------------------------------------------
def _union_find_pairs(f: list[float]) -> list[tuple[float, float]]:
    """0-dim sublevel persistence of a sequence by the textbook algorithm (elder rule), non-zero pairs only."""
    order = sorted(range(len(f)), key=lambda i: (f[i], i))
    parent: dict[int, int] = {}
    oldest: dict[int, tuple[float, int]] = {}

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    pairs = []
    for i in order:
        parent[i], oldest[i] = i, (f[i], i)
        for j in (i - 1, i + 1):
            if j in parent:
                ri, rj = find(i), find(j)
                if ri != rj:
                    young, old = (ri, rj) if oldest[ri] > oldest[rj] else (rj, ri)
                    pairs.append((oldest[young][0], f[i]))
                    parent[young] = old
    return sorted(p for p in pairs if p[1] > p[0])


def _pairs(f: torch.Tensor) -> list[list[tuple[float, float]]]:
    birth, death, ok = sublevel_persistence_1d(f)
    return [
        sorted((b, d) for b, d, v in zip(*rows, strict=True) if v and d > b)
        for rows in zip(birth.tolist(), death.tolist(), ok.tolist(), strict=True)
    ]


def test_sublevel_persistence_hand_made():
    # minima 1, 0, 2; peaks 5 and 3: the component born at 2 dies at 3, the one born at 1 at 5; 0 never dies
    assert _pairs(torch.tensor([[1.0, 5.0, 0.0, 3.0, 2.0, 6.0]])) == [[(1.0, 5.0), (2.0, 3.0)]]
    assert _pairs(torch.tensor([[3.0, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]])) == [[(1.0, 4.0), (2.0, 9.0), (3.0, 6.0)]]
    assert _pairs(torch.tensor([[2.0, 2.0, 2.0], [0.0, 1.0, 2.0]])) == [[], []]  # flat and monotone: no pair


def test_sublevel_persistence_matches_union_find():
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 4, (20, 17), generator=g).double()  # plateaus everywhere
    floats = torch.randn(20, 40, generator=g, dtype=torch.float64)
    for f in (ties, floats):
        assert _pairs(f) == [_union_find_pairs(row) for row in f.tolist()]


def test_death_time_of_a_far_point_is_its_nearest_neighbour_distance():
    pen, logits, _, _ = make_model_outputs(15, 6, 2, seed=2)
    ref = build_reference(pen, logits)
    far = pen[:1] + 10.0
    z_far = ref.standardize(far)
    death, _ = death_time(z_far, ref)
    # independent: single linkage on clean ∪ {x}; x (index N) first merges at its component's death time
    pts = torch.cat([ref.z, z_far]).numpy()
    merges = linkage(pts, method="single")
    first = next(row for row in merges if 15 in (int(row[0]), int(row[1])))
    assert float(death[0]) == pytest.approx(first[2], rel=1e-9)
    assert float(death[0]) == pytest.approx(cdist(pts[-1:], pts[:-1]).min(), rel=1e-9)
    # and relative to the clean set's MST edges (its own 0-dim death times)
    mst = np.sort(minimum_spanning_tree(cdist(pts[:-1], pts[:-1])).data)
    feats = compute_features(far, logits[:1], ref, ["topology"])
    assert float(_col(feats, "topology.death_max", ["topology"])[0]) == pytest.approx(
        math.log(first[2] / mst.max()), rel=1e-5
    )
    assert float(_col(feats, "topology.death_median", ["topology"])[0]) == pytest.approx(
        math.log(first[2] / np.median(mst)), rel=1e-5
    )


def test_landscape_features_known_answer():
    # clean mean increasing with the unit index, so the landscape is the z-vector in unit order
    clean = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    ref = build_reference(clean, torch.zeros(2, 2))
    z = torch.tensor([[1.0, 5.0, 0.0, 3.0, 2.0, 6.0]])  # pairs (1, 5) and (2, 3): persistence 4 and 1
    x = ref.mean.float() + z * ref.std.float()
    feats = compute_features(x, torch.zeros(1, 2), ref, ["topology"])
    col = lambda n: float(_col(feats, f"topology.{n}", ["topology"])[0])  # noqa: E731
    assert col("landscape_total") == pytest.approx(5.0 / 6, rel=1e-5)
    assert col("landscape_max") == pytest.approx(math.log1p(4.0), rel=1e-5)
    assert col("landscape_count") == pytest.approx(1.0 / 6, rel=1e-5)  # only 4 > 2
    p = np.array([0.8, 0.2])
    assert col("landscape_entropy") == pytest.approx(-(p * np.log(p)).sum() / math.log(2), rel=1e-5)


# ---- behaviour -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [2, 10])
def test_uniform_logits_have_entropy_one(c):
    ref = build_reference(torch.randn(5, 4), torch.randn(5, c))
    logits = torch.stack([torch.zeros(c), torch.full((c,), 7.0), torch.eye(c)[0] * 100.0])
    feats = compute_features(torch.randn(3, 4), logits, ref, ["behaviour"])
    ent = _col(feats, "behaviour.entropy", ["behaviour"])
    assert ent.tolist() == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)
    conf = _col(feats, "behaviour.confidence", ["behaviour"])
    assert conf.tolist() == pytest.approx([1.0 / c, 1.0 / c, 1.0], abs=1e-6)


def test_margin_and_predicted_class_frequency():
    clean_logits = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    ref = build_reference(torch.randn(4, 5), clean_logits)  # clean margins 2, 2, 2, 1; predicted 0, 0, 1, 0
    logits = torch.tensor([[0.0, 0.0, 4.0], [2.0, 0.0, 0.0]])
    feats = compute_features(torch.randn(2, 5), logits, ref, ["behaviour"])
    margin = _col(feats, "behaviour.margin", ["behaviour"])
    assert margin.tolist() == pytest.approx([math.log1p(4.0 / 2.0), math.log(2.0)], rel=1e-5)
    assert _col(feats, "behaviour.margin_rank", ["behaviour"]).tolist() == pytest.approx([1.0, 0.25 + 0.5 * 0.75])
    # class 2 is never predicted on the clean set: (0 + 1) / (4 + 3); class 0: (3 + 1) / 7
    freq = _col(feats, "behaviour.pred_freq", ["behaviour"])
    assert freq.tolist() == pytest.approx([math.log(3 / 7), math.log(12 / 7)], rel=1e-5)


# ---- consistency ---------------------------------------------------------------------------------------------------
def test_huge_margin_is_fully_consistent():
    d = 16
    w = torch.stack([torch.ones(d), -torch.ones(d)])
    b = torch.zeros(2)
    pen = torch.rand(6, d, generator=torch.Generator().manual_seed(0))
    ref = build_reference(pen, pen @ w.T + b, w, b)
    x = torch.full((1, d), 100.0)
    feats = compute_features(x, x @ w.T + b, ref, ["consistency"])
    names = feature_names(["consistency"])
    for name, value in zip(names, feats[0].tolist(), strict=True):
        assert value == pytest.approx(1.0 if ".keep" in name else 0.0, abs=1e-6), name


def test_boundary_point_is_not_consistent_and_depends_on_the_seed():
    d = 64
    w, b = make_head(d, 2)
    b = torch.zeros(2)
    pen = make_activations(8, d)
    ref = build_reference(pen, pen @ w.T, w, b)
    x = make_activations(1, d, seed=4)
    diff = w[0] - w[1]
    x = x - (x @ diff) / (diff @ diff) * diff + 1e-4 * diff  # on the decision boundary, class 0 by a hair
    feats = compute_features(x, x @ w.T, ref, ["consistency"])
    keep = _col(feats, "consistency.keep_p50", ["consistency"])
    assert 0.0 < float(keep[0]) < 1.0
    other = compute_features(x, x @ w.T, ref, ["consistency"], seed=1)
    assert not torch.equal(feats, other)


def test_without_head_consistency_is_neutral():
    pen, logits, _, _ = make_model_outputs(5, 8, 3)
    ref = build_reference(pen, logits)
    feats = compute_features(pen, logits, ref, ["consistency"])
    names = feature_names(["consistency"])
    for j, name in enumerate(names):
        assert feats[:, j].tolist() == [0.5 if ".keep" in name else 0.0] * 5
