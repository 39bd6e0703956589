"""The clean reference: validation, leave-one-out, and its statistics against independent implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feature_data import make_model_outputs
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import cdist
from sklearn.covariance import LedoitWolf

from metashield_hf.features import build_reference, reference_without
from metashield_hf.features.reference import ledoit_wolf, mst_edge_lengths


def test_needs_two_samples():
    with pytest.raises(ValueError, match="need at least 2 clean samples, got 1"):
        build_reference(torch.randn(1, 8), torch.randn(1, 3))


def test_non_finite_is_named_with_its_count():
    pen = torch.randn(5, 8)
    pen[1, 2] = float("nan")
    pen[3, 0] = float("inf")
    with pytest.raises(ValueError, match="penultimate has 2 non-finite values in 2 of 5 rows"):
        build_reference(pen, torch.randn(5, 3))
    logits = torch.randn(5, 3)
    logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits has 1 non-finite values"):
        build_reference(torch.randn(5, 8), logits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_weight": torch.randn(3, 7)}, r"head_weight must be \(C=3, D=8\)"),
        ({"head_bias": torch.randn(4)}, r"head_bias must be \(C=3,\)"),
        ({"k": 0}, "k must be a positive int, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_reference(torch.randn(5, 8), torch.randn(5, 3), **kwargs)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="penultimate has 5 rows but logits has 4"):
        build_reference(torch.randn(5, 8), torch.randn(4, 3))
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        build_reference(torch.randn(8), torch.randn(1, 3))


def test_k_is_clipped_to_n_minus_1():
    assert build_reference(torch.randn(4, 8), torch.randn(4, 3), k=10).k == 3
    assert build_reference(torch.randn(2, 8), torch.randn(2, 3)).k == 1


def test_reference_without_matches_a_fresh_build():
    pen, logits, w, b = make_model_outputs(8, 16, 4, seed=3)
    ref = build_reference(pen, logits, w, b, k=7)
    sub = reference_without(ref, 2)
    keep = [i for i in range(8) if i != 2]
    fresh = build_reference(pen[keep], logits[keep], w, b, k=7)
    assert sub.num_samples == 7 and sub.k == 6 and sub.k_requested == 7
    for name in ("mean", "std", "z", "loo_knn", "mst", "loo_cos", "loo_maha", "class_freq"):
        torch.testing.assert_close(getattr(sub, name), getattr(fresh, name))
    assert torch.equal(sub.head_weight, w)
    # negative index and range errors
    torch.testing.assert_close(reference_without(ref, -1).mean, pen[:-1].double().mean(0))
    with pytest.raises(IndexError, match="sample index 8 out of range"):
        reference_without(ref, 8)
    with pytest.raises(ValueError, match="leave-one-out needs at least 3 clean samples"):
        reference_without(build_reference(pen[:2], logits[:2]), 0)


def test_standardize_known_answer():
    pen = torch.tensor([[0.0, 10.0], [2.0, 10.0], [4.0, 10.0]])
    ref = build_reference(pen, torch.zeros(3, 2))
    z = ref.standardize(torch.tensor([[2.0, 10.0], [2.0 + 8.0 / 6**0.5, 10.0]]))
    # unit 0: mean 2, population std sqrt(8/3), floored by sqrt(std² + floor²) with floor ≈ 1% of the mean std
    assert z[0].abs().max() < 1e-12
    assert z[1, 0] == pytest.approx(8.0 / 6**0.5 / (8.0 / 3) ** 0.5, rel=1e-3)
    assert z[1, 1] == 0.0  # a constant unit is legal: z = 0 at its value


def test_ledoit_wolf_matches_sklearn():
    rng = np.random.default_rng(0)
    for n, d in [(20, 10), (10, 40), (50, 5)]:
        mix = rng.normal(size=(d, d))
        x = rng.normal(size=(n, d)) @ mix + 3.0
        shrinkage, mu = ledoit_wolf(torch.from_numpy(x))
        lw = LedoitWolf().fit(x)
        assert shrinkage == pytest.approx(lw.shrinkage_, rel=1e-9, abs=1e-12)
        xc = x - x.mean(0)
        emp = xc.T @ xc / n
        assert mu == pytest.approx(np.trace(emp) / d, rel=1e-12)
        np.testing.assert_allclose((1 - shrinkage) * emp + shrinkage * mu * np.eye(d), lw.covariance_, rtol=1e-9)


def test_mahalanobis_matches_sklearn_ledoit_wolf():
    pen, logits, _, _ = make_model_outputs(20, 12, 3, seed=5)
    ref = build_reference(pen, logits)
    assert ref.lw_shrinkage > 1e-3  # the precision floor is not active here
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1)) + 0.5
    z = ref.standardize(x)
    lw = LedoitWolf().fit(ref.z.numpy())
    np.testing.assert_allclose(ref.mahalanobis(z).numpy(), lw.mahalanobis(z.numpy()), rtol=1e-8)


def test_loo_mahalanobis_known_answer():
    """Each clean sample's value equals the explicit Mahalanobis² under the other samples' covariance (same
    shrinkage, the sample standardized without itself)."""
    pen, logits, _, _ = make_model_outputs(9, 6, 3, seed=7)
    ref = build_reference(pen, logits)
    h = pen.double()
    n = 9
    s = max(ref.lw_shrinkage, 1e-3)
    for i in range(n):
        others = torch.cat([ref.z[:i], ref.z[i + 1 :]]) - ref.lw_location
        cov = s * ref.lw_mu * torch.eye(6, dtype=torch.float64) + (1 - s) / n * others.T @ others
        rest = torch.cat([h[:i], h[i + 1 :]])
        std = (rest.var(0, unbiased=False) + (ref.std**2 - h.var(0, unbiased=False))).sqrt()  # same floor
        xi = (h[i] - rest.mean(0)) / std - ref.lw_location
        explicit = xi @ torch.linalg.solve(cov, xi)
        assert float(ref.loo_maha[i]) == pytest.approx(float(explicit), rel=1e-8)


def test_loo_knn_and_nn_known_answer():
    pen, logits, _, _ = make_model_outputs(7, 5, 2, seed=8)
    ref = build_reference(pen, logits, k=3)
    h = pen.double()
    for i in range(7):
        rest = torch.cat([h[:i], h[i + 1 :]])
        std = (rest.var(0, unbiased=False) + (ref.std**2 - h.var(0, unbiased=False))).sqrt()
        d = ((h[i] - rest) / std).norm(dim=1).sort().values
        assert float(ref.loo_knn[i]) == pytest.approx(float(d[:3].mean()), rel=1e-9)
        assert float(ref.nn_dist[i]) == pytest.approx(float(d[0]), rel=1e-9)


def test_mst_matches_scipy():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(25, 4))
    dist = cdist(pts, pts)
    expected = np.sort(minimum_spanning_tree(dist).data)
    np.testing.assert_allclose(mst_edge_lengths(torch.from_numpy(dist)).numpy(), expected, rtol=1e-12)
    pen, logits, _, _ = make_model_outputs(12, 8, 3)
    ref = build_reference(pen, logits)
    z = ref.z.numpy()
    np.testing.assert_allclose(ref.mst.numpy(), np.sort(minimum_spanning_tree(cdist(z, z)).data), rtol=1e-9)
