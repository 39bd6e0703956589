"""Trigger synthesis with a screen and refine stage: a refined class follows its full-budget trajectory, the others
keep their screen result, and the options are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metashield_hf.scan.synthesis import refine_candidates, synthesis_space, synthesize_triggers
from metashield_hf.targets import load_target

pytestmark = pytest.mark.usefixtures("one_thread")

K = 6


@pytest.fixture(scope="module")
def space_and_pred():
    """A tiny transformers ResNet with 6 classes (random weights, eval mode) on 8 seeded random images."""
    from PIL import Image
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=K)
    model = ResNetForImageClassification(cfg).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    adapter = load_target(model, ConvNextImageProcessor(size={"shortest_edge": 32}))
    items = list(adapter.iter_items(images))
    return synthesis_space(adapter, items), adapter(items).logits.argmax(-1)


def _run(space, pred, steps=20, **kw):
    # a fast cost schedule, so that masks shrink within a few steps on this small model
    return synthesize_triggers(
        space, pred, K, steps=steps, flip_threshold=0.9, init_cost=1.0, patience=1, seed=0, **kw
    )


def test_refined_classes_follow_the_full_run_and_the_rest_keep_the_screen(space_and_pred):
    space, pred = space_and_pred
    full, screen = _run(space, pred), _run(space, pred, steps=8)
    staged = _run(space, pred, refine=1, screen_steps=8)
    chosen = refine_candidates(
        torch.tensor(screen.sizes), torch.tensor(screen.reached), torch.tensor(screen.flip_rates), 1
    ).numpy()
    assert (staged.sizes[chosen] < screen.sizes[chosen]).all()  # the refinement did shrink the trigger
    rest = np.setdiff1d(np.arange(K), chosen)
    # a class's trajectory does not depend on which classes share its batch
    np.testing.assert_allclose(staged.sizes[chosen], full.sizes[chosen], rtol=1e-4)
    np.testing.assert_allclose(staged.sizes[rest], screen.sizes[rest], rtol=1e-4)
    # an effective trigger's recorded size only shrinks with more steps: its screen size bounds the full-run size
    effective = rest[screen.reached[rest]]
    assert len(effective) and (staged.sizes[effective] >= full.sizes[effective] * (1 - 1e-4)).all()
    assert staged.logits.shape == full.logits.shape and staged.masks.shape == full.masks.shape


def test_refining_every_class_is_the_full_run(space_and_pred):
    space, pred = space_and_pred
    full, all_refined = _run(space, pred), _run(space, pred, refine=K, screen_steps=4)
    long_screen = _run(space, pred, refine=2, screen_steps=20)
    np.testing.assert_array_equal(all_refined.sizes, full.sizes)
    np.testing.assert_array_equal(long_screen.sizes, full.sizes)


def test_refine_candidates_rank_effective_triggers_first():
    sizes = torch.tensor([0.2, 0.05, 0.9, 0.01, 0.3])
    reached = torch.tensor([True, True, False, False, True])
    flips = torch.tensor([1.0, 1.0, 0.8, 0.2, 1.0])
    # class 3 has the smallest mask but never flipped enough samples: it ranks after every effective one
    assert refine_candidates(sizes, reached, flips, 3).tolist() == [0, 1, 4]
    assert refine_candidates(sizes, reached, flips, 4).tolist() == [0, 1, 2, 4]


@pytest.mark.parametrize("kw", [{"refine": 0, "screen_steps": 4}, {"refine": 2}, {"refine": 2, "screen_steps": 0}])
def test_bad_screen_options(space_and_pred, kw):
    space, pred = space_and_pred
    with pytest.raises(ValueError, match="refine"):
        _run(space, pred, **kw)


def test_snapshots_are_the_shorter_runs(space_and_pred):
    space, pred = space_and_pred
    full = _run(space, pred, snapshots=[4, 12])
    assert sorted(full.snapshots) == [4, 12] and full.steps == 20
    np.testing.assert_array_equal(full.sizes, _run(space, pred).sizes)  # snapshots do not change the run
    for b, snap in full.snapshots.items():
        short = _run(space, pred, steps=b)
        assert snap.steps == b
        np.testing.assert_array_equal(snap.sizes, short.sizes)
        np.testing.assert_array_equal(snap.masks, short.masks)
        torch.testing.assert_close(snap.logits, short.logits)
    assert not np.array_equal(full.snapshots[4].sizes, full.sizes)  # the budget matters on this model


@pytest.mark.parametrize(
    "kw", [{"snapshots": [20]}, {"snapshots": [0, 4]}, {"snapshots": [4], "refine": 2, "screen_steps": 8}]
)
def test_bad_snapshots(space_and_pred, kw):
    space, pred = space_and_pred
    with pytest.raises(ValueError, match="snapshots"):
        _run(space, pred, **kw)


def test_uniform_mask_is_one_blend_ratio_per_class(space_and_pred):
    space, pred = space_and_pred
    result = _run(space, pred, steps=8, uniform_mask=True)
    assert result.masks.shape == (K, 1, 1, 1) and result.patterns.shape[0] == K
    ratios = result.masks.flatten()
    assert ((ratios > 0) & (ratios < 1)).all()
    # an effective trigger's size is its blend ratio (one that never flipped enough keeps its last step's size)
    reached = np.flatnonzero(result.reached)
    assert len(reached) > 0
    np.testing.assert_allclose(result.sizes[reached], ratios.numpy()[reached], rtol=1e-6)
    # the recorded outputs are the model's on (1 - a) x + a p, every pixel blended alike
    x = space.run(torch.zeros(space.num_samples, *space.mask_shape[1:]), torch.zeros(1, *space.pattern_shape[1:]), 1)
    k = int(reached[0])
    mask = ratios[k].expand(space.num_samples, *space.mask_shape[1:])
    logits, _ = space.run(mask, result.patterns[k : k + 1].expand(space.num_samples, -1, -1, -1), 1)
    torch.testing.assert_close(logits, result.logits[k])
    assert not torch.equal(logits, x[0])


def test_easiest_weighs_the_lowest_loss_share_of_the_valid_samples():
    from metashield_hf.scan.synthesis import _easiest

    ce = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.2], [0.4, 0.3, 0.2, 0.1, 0.0]])
    valid = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    w = _easiest(ce, valid, 0.5)
    # row 0: 4 valid samples, the two easiest valid ones (0.1, 0.3); the invalid 0.2 never counts
    torch.testing.assert_close(w[0], torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]))
    # row 1: ceil(2.5) = 3 samples of lowest loss
    torch.testing.assert_close(w[1], torch.tensor([0.0, 0.0, 1 / 3, 1 / 3, 1 / 3]))


def test_loss_quantile_one_is_the_plain_synthesis_and_a_half_differs(space_and_pred):
    space, pred = space_and_pred
    plain = _run(space, pred, steps=6)
    np.testing.assert_array_equal(_run(space, pred, steps=6, loss_quantile=1.0).sizes, plain.sizes)
    half = _run(space, pred, steps=6, loss_quantile=0.5)
    assert not np.array_equal(half.sizes, plain.sizes)
    with pytest.raises(ValueError, match="loss_quantile"):
        _run(space, pred, loss_quantile=0.0)
