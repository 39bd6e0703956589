"""Large images are synthesized on downsized clean samples (MAX_SYNTHESIS_SIDE), with the triggers and outputs back at
the model's own size; a model that cannot take the smaller size keeps its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metashield_hf.scan.synthesis import MAX_SYNTHESIS_SIDE, synthesis_space, synthesize_triggers
from metashield_hf.targets import load_target

pytestmark = pytest.mark.usefixtures("one_thread")

K, SIDE = 4, 2 * MAX_SYNTHESIS_SIDE


def _conv(pool: bool) -> nn.Module:
    """A 4-class CNN: global average pooling (any input size) or a flatten that fixes the input size."""
    torch.manual_seed(0)
    tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, K)] if pool else [nn.Flatten(), nn.Linear(4 * 16, K)]
    if not pool:
        tail.insert(0, nn.AvgPool2d(SIDE // 4))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), *tail).eval()


def _synthesize(model, **kw):
    x = torch.rand(8, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    adapter = load_target(model)
    items = list(adapter.iter_items(x))
    space = synthesis_space(adapter, items)
    pred = adapter(items).logits.argmax(-1)
    return synthesize_triggers(space, pred, K, steps=3, seed=0, **kw)


def test_large_images_are_synthesized_downsized_and_returned_at_their_own_size():
    result = _synthesize(_conv(pool=True))
    assert result.synthesized_at == (MAX_SYNTHESIS_SIDE, MAX_SYNTHESIS_SIDE)
    assert result.masks.shape == (K, 1, SIDE, SIDE) and result.patterns.shape == (K, 3, SIDE, SIDE)
    assert result.inputs.shape == (8, 3, SIDE, SIDE) and result.logits.shape == (K, 8, K)
    full = _synthesize(_conv(pool=True), max_side=0)
    assert full.synthesized_at is None and full.masks.shape == result.masks.shape


def test_a_model_that_needs_its_own_size_keeps_it():
    result = _synthesize(_conv(pool=False))
    assert result.synthesized_at is None and result.masks.shape == (K, 1, SIDE, SIDE)
