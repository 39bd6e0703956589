"""Contract tests run over every registered feature group (a new group is tested the moment it registers)."""

from __future__ import annotations

import pytest
import torch
from feature_data import make_activations, make_head, make_model_outputs

from metashield_hf.features import FEATURE_GROUPS, build_reference, compute_features, feature_names

GROUPS = FEATURE_GROUPS.list()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", GROUPS)
def test_group_shape_dtype_and_names(name):
    group = FEATURE_GROUPS.get(name)
    assert group.names and len(set(group.names)) == len(group.names)
    assert all(n.replace("_", "").isalnum() and n == n.lower() for n in group.names)
    pen, logits, w, b = make_model_outputs(10, 16, 3)
    ref = build_reference(pen, logits, w, b)
    x = make_activations(5, 16, seed=9)
    out = group(x.double(), (x @ w.T + b).double(), ref, _gen())
    assert out.shape == (5, len(group.names)) and out.dtype == torch.float64
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize(("d", "c"), [(8, 2), (64, 10), (768, 2), (768, 10), (1, 3)])
def test_group_width_free(name, d, c):
    """Same number of features for any activation width D and class count C (D = 1 included)."""
    pen, logits, w, b = make_model_outputs(6, d, c, seed=d + c)
    ref = build_reference(pen, logits, w, b)
    x = make_activations(3, d, seed=2)
    out = FEATURE_GROUPS.get(name)(x.double(), (x @ w.T + b).double(), ref, _gen())
    assert out.shape == (3, len(FEATURE_GROUPS.get(name).names))
    assert torch.isfinite(out).all()


def test_feature_count_is_width_free():
    widths = set()
    for d in (8, 64, 768):
        for c in (2, 10):
            pen, logits, w, b = make_model_outputs(6, d, c)
            ref = build_reference(pen, logits, w, b)
            widths.add(compute_features(pen[:2], logits[:2], ref).shape[1])
    assert widths == {len(feature_names())}


@pytest.mark.parametrize("name", GROUPS)
def test_group_rows_do_not_depend_on_the_batch(name):
    """Row i of a batch equals the features of input i alone (perturbations are shared by the batch)."""
    pen, logits, w, b = make_model_outputs(12, 32, 4, seed=4)
    ref = build_reference(pen, logits, w, b)
    x = make_activations(7, 32, seed=5)
    lx = (x @ w.T + b).double()
    group = FEATURE_GROUPS.get(name)
    full = group(x.double(), lx, ref, _gen(3))
    for i in (0, 4, 6):
        one = group(x[i : i + 1].double(), lx[i : i + 1], ref, _gen(3))
        torch.testing.assert_close(one[0], full[i], rtol=1e-5, atol=1e-5)


def _scaled_ref_and_batch(kind: str, d: int, c: int, n: int):
    """A clean set and a test batch of one extreme kind."""
    w, b = make_head(d, c)
    base = make_activations(n + 3, d, seed=11)
    if kind == "constant":
        acts = torch.full((n + 3, d), 3.7)
    elif kind == "zeros":
        acts = torch.zeros(n + 3, d)
    elif kind == "huge":
        acts = 1e6 * base
    elif kind == "huge_constant":
        acts = torch.full((n + 3, d), 1e6)
    elif kind == "tiny":
        acts = 1e-8 * base
    else:
        raise AssertionError(kind)
    logits = acts @ w.T + b
    if kind in ("constant", "zeros"):
        logits = torch.zeros_like(logits)  # constant logits as well
    clean, test = acts[:n], acts[n:]
    # the test batch: one like the clean set, one at zero, one far off at the batch's own scale
    scale = float(acts.abs().max()) or 1.0
    test = torch.cat([test[:1], torch.zeros(1, d), test[2:] + scale * torch.linspace(-1, 1, d)])
    test_logits = torch.cat([logits[n : n + 1], b[None], (test[2:] @ w.T + b)])
    return clean, logits[:n], w, b, test, test_logits


@pytest.mark.parametrize("kind", ["constant", "zeros", "huge", "huge_constant", "tiny"])
@pytest.mark.parametrize("n", [2, 6])
@pytest.mark.parametrize("with_head", [True, False])
def test_all_features_finite_on_extreme_activations(kind, n, with_head):
    clean, clean_logits, w, b, test, test_logits = _scaled_ref_and_batch(kind, 24, 3, n)
    ref = build_reference(clean, clean_logits, w if with_head else None, b if with_head else None)
    feats = compute_features(test, test_logits, ref)
    assert feats.shape == (3, len(feature_names())) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all(), [feature_names()[j] for j in (~torch.isfinite(feats)).any(0).nonzero()[:, 0]]
    # the clean set's own features too
    assert torch.isfinite(compute_features(clean, clean_logits, ref)).all()


def test_constant_logits_are_finite():
    pen, _, w, b = make_model_outputs(5, 16, 4)
    ref = build_reference(pen, torch.ones(5, 4), w, b)
    assert torch.isfinite(compute_features(pen, torch.ones(5, 4), ref)).all()
