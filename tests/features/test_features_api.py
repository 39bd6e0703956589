"""Public API of ψ: names and layout, group selection, determinism, leave-one-out, input validation."""

from __future__ import annotations

import pytest
import torch
from feature_data import make_activations, make_model_outputs

from metashield_hf.features import (
    DEFAULT_GROUPS,
    FEATURE_GROUPS,
    build_reference,
    compute_features,
    feature_names,
    loo_features,
    reference_without,
)


@pytest.fixture(scope="module")
def setup():
    pen, logits, w, b = make_model_outputs(10, 24, 4, seed=2)
    ref = build_reference(pen, logits, w, b)
    x = make_activations(5, 24, seed=8)
    return ref, x, x @ w.T + b


def test_default_groups_are_registered_in_order():
    assert DEFAULT_GROUPS == ("moments", "distances", "topology", "behaviour", "consistency")
    assert set(DEFAULT_GROUPS) <= set(FEATURE_GROUPS.list())
    names = feature_names()
    assert [n.split(".")[0] for n in names] == [g for g in DEFAULT_GROUPS for _ in FEATURE_GROUPS.get(g).names]
    assert len(names) == len(set(names))
    assert feature_names("behaviour") == feature_names(["behaviour"])


def test_feature_names_length_equals_f(setup):
    ref, x, lx = setup
    for groups in (None, ["moments"], ["consistency", "topology"]):
        assert compute_features(x, lx, ref, groups).shape == (5, len(feature_names(groups)))


def test_unknown_group_lists_the_available_ones(setup):
    ref, x, lx = setup
    with pytest.raises(KeyError, match=r"unknown feature_group 'shape'; available: behaviour, consistency"):
        feature_names(["moments", "shape"])
    with pytest.raises(KeyError, match="available: .*topology"):
        compute_features(x, lx, ref, ["nope"])


def test_bad_group_selection(setup):
    with pytest.raises(ValueError, match="no feature groups selected"):
        feature_names([])
    with pytest.raises(ValueError, match=r"feature groups \['moments'\] are selected more than once"):
        feature_names(["moments", "behaviour", "moments"])


def test_same_seed_same_features(setup):
    ref, x, lx = setup
    assert torch.equal(compute_features(x, lx, ref, seed=3), compute_features(x, lx, ref, seed=3))


def test_dropping_a_group_leaves_the_others_unchanged(setup):
    """Each group has its own generator, so ablations compare like with like."""
    ref, x, lx = setup
    full = compute_features(x, lx, ref, seed=5)
    names = feature_names()
    for group in DEFAULT_GROUPS:
        cols = [i for i, n in enumerate(names) if n.startswith(group + ".")]
        torch.testing.assert_close(compute_features(x, lx, ref, [group], seed=5), full[:, cols], rtol=1e-6, atol=1e-6)


def test_loo_features_equal_rows_against_reference_without(setup):
    ref, _, _ = setup
    loo = loo_features(ref, seed=2)
    assert loo.shape == (10, len(feature_names())) and torch.isfinite(loo).all()
    for i in (0, 3, 9):
        row = compute_features(ref.penultimate[i : i + 1], ref.logits[i : i + 1], reference_without(ref, i), seed=2)
        assert torch.equal(loo[i], row[0])
    assert torch.equal(loo_features(ref, seed=2), loo)


def test_loo_features_differ_from_in_sample_features(setup):
    """In-sample a clean sample is its own nearest neighbour (kNN distance 0 for k = 1): leave-one-out is not."""
    pen, logits, w, b = make_model_outputs(6, 24, 4, seed=2)
    ref = build_reference(pen, logits, w, b, k=1)
    col = feature_names().index("topology.death_max")
    in_sample = compute_features(pen, logits, ref)[:, col]
    assert (in_sample < -10).all()  # log of ~0 over the MST's longest edge
    assert (loo_features(ref)[:, col] > -3).all()


def test_loo_features_needs_three_samples():
    pen, logits, w, b = make_model_outputs(2, 8, 3)
    with pytest.raises(ValueError, match="leave-one-out needs at least 3 clean samples"):
        loo_features(build_reference(pen, logits, w, b))


def test_input_validation(setup):
    ref, x, lx = setup
    with pytest.raises(ValueError, match="penultimate has width 23 but the clean reference has D=24"):
        compute_features(x[:, :23], lx, ref)
    with pytest.raises(ValueError, match="logits has width 3 but the clean reference has C=4"):
        compute_features(x, lx[:, :3], ref)
    with pytest.raises(ValueError, match=r"must be a 2-D tensor \(B, D\); got \(24,\)"):
        compute_features(x[0], lx, ref)
    with pytest.raises(ValueError, match="penultimate has 5 rows but logits has 4"):
        compute_features(x, lx[:4], ref)
    bad = x.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="penultimate has 1 non-finite values in 1 of 5 rows"):
        compute_features(bad, lx, ref)


def test_empty_batch(setup):
    ref, x, lx = setup
    assert compute_features(x[:0], lx[:0], ref).shape == (0, len(feature_names()))


def test_float64_and_grad_inputs_are_accepted(setup):
    ref, x, lx = setup
    x64 = x.double().requires_grad_(True)
    out = compute_features(x64, lx.double(), ref)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, compute_features(x, lx, ref), rtol=1e-4, atol=1e-4)
