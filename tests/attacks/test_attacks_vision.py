"""Known answers for the vision triggers, computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metashield_hf.attacks import (
    NOISE_COLUMN,
    POISONED_COLUMN,
    SIG,
    BadNets,
    Blend,
    Filter,
    TrojanWatermark,
    WaNet,
    attack_from_dict,
)
from metashield_hf.attacks.vision import patch_origin


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _outside(y: torch.Tensor, x: torch.Tensor, rows: slice, cols: slice) -> None:
    keep = torch.ones(x.shape[-2:], dtype=torch.bool)
    keep[rows, cols] = False
    assert torch.equal(y[..., keep], x[..., keep]), "pixels outside the trigger region changed"


def test_badnets_white_patch_bottom_right():
    x = torch.zeros(2, 1, 8, 8)
    y = BadNets(patch_size=3, pattern="white").apply(x)
    expected = torch.zeros(8, 8)
    expected[5:, 5:] = 1
    assert torch.equal(y, expected.expand(2, 1, 8, 8))


def test_badnets_checkerboard_at_explicit_location_changes_nothing_else():
    x = _rand(2, 3, 10, 12)
    y = BadNets(patch_size=3, location=(2, 7), pattern="checkerboard").apply(x)
    board = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert torch.equal(y[:, :, 2:5, 7:10], board.expand(2, 3, 3, 3))
    _outside(y, x, slice(2, 5), slice(7, 10))


@pytest.mark.parametrize(
    ("location", "margin", "origin"),
    [
        ("bottom_right", 0, (6, 9)),
        ("bottom_right", 1, (5, 8)),
        ("top_left", 2, (2, 2)),
        ("top_right", 0, (0, 9)),
        ("bottom_left", 0, (6, 0)),
        ("center", 0, (3, 4)),
        ((-3, -3), 0, (6, 9)),
        ((1, 2), 5, (1, 2)),
    ],
)
def test_patch_locations(location, margin, origin):
    assert patch_origin(location, (3, 3), (9, 12), margin) == origin
    x = torch.zeros(1, 9, 12)
    y = BadNets(patch_size=3, location=location, pattern="white", margin=margin).apply(x)
    r, c = origin
    assert y.sum() == 9 and torch.equal(y[0, r : r + 3, c : c + 3], torch.ones(3, 3))


def test_badnets_on_uint8_pil_and_numpy():
    a = np.full((8, 8), 100, dtype=np.uint8)
    out = np.asarray(BadNets(patch_size=2, pattern="checkerboard").apply(Image.fromarray(a)))
    expected = a.copy()
    expected[6:, 6:] = [[255, 0], [0, 255]]
    assert np.array_equal(out, expected)
    rgb = np.full((2, 8, 8, 3), 7, dtype=np.uint8)
    out = BadNets(patch_size=2, pattern="white", location="top_left").apply(rgb)
    expected = rgb.copy()
    expected[:, :2, :2, :] = 255
    assert np.array_equal(out, expected)


def test_badnets_random_pattern_is_seeded_binary():
    p0, p1 = (
        BadNets(patch_size=5, pattern="random", seed=0).patch(),
        BadNets(patch_size=5, pattern="random", seed=1).patch(),
    )
    assert set(p0.unique().tolist()) <= {0.0, 1.0} and not torch.equal(p0, p1)
    assert torch.equal(p0, BadNets(patch_size=5, pattern="random", seed=0).patch())


def test_badnets_errors():
    with pytest.raises(ValueError, match="does not fit a 4x4 image"):
        BadNets(patch_size=5).apply(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="pattern must be one of"):
        BadNets(pattern="stripes")
    with pytest.raises(ValueError, match="location must be one of"):
        BadNets(location="middle")
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        BadNets(patch_size=0)


def test_blend_known_answers():
    x = _rand(3, 3, 9, 7)
    assert torch.equal(Blend(alpha=0.0).apply(x), x)
    attack = Blend(alpha=1.0, seed=4)
    assert torch.equal(attack.apply(x), attack.pattern_image(3, 9, 7).expand(3, 3, 9, 7))
    half = Blend(alpha=0.5, seed=4).apply(x)
    torch.testing.assert_close(half, (x + attack.pattern_image(3, 9, 7)) / 2)
    gray = Image.fromarray((np.arange(64, dtype=np.uint8) * 3).reshape(8, 8))
    assert np.array_equal(np.asarray(Blend(alpha=0.0).apply(gray)), np.asarray(gray))


def test_sig_known_answers():
    x = torch.full((2, 3, 4, 12), 0.5)
    assert torch.equal(SIG(delta=0.0).apply(x), x)
    out = SIG(delta=0.1, frequency=3).apply(x)
    diff = out - x
    assert torch.equal(diff[..., 0], torch.zeros(2, 3, 4))  # sin(0)
    assert torch.allclose(diff[..., 1], torch.full((2, 3, 4), 0.1))  # column 1 of 12 at 3 cycles: sin(pi / 2)
    assert torch.equal(diff, diff[:1, :1, :1].expand_as(diff))  # the same signal on every row, channel and image
    assert float(SIG(delta=0.3).apply(torch.ones(1, 1, 2, 8)).max()) == 1.0  # clipped to the pixel range
    assert not SIG().seed_dependent and SIG(seed=1).apply(x).equal(SIG(seed=2).apply(x))
    with pytest.raises(ValueError):
        SIG(frequency=0)


def test_blend_patterns():
    assert not torch.equal(Blend(seed=0).pattern_image(1, 8, 8), Blend(seed=1).pattern_image(1, 8, 8))
    fixed = Blend(pattern="fixed_noise", seed=0).pattern_image(3, 8, 8)
    assert torch.equal(fixed, Blend(pattern="fixed_noise", seed=9).pattern_image(3, 8, 8))
    assert not Blend(pattern="fixed_noise").seed_dependent
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\]"):
        Blend(alpha=1.5)


def test_trojan_watermark_known_answer():
    attack = TrojanWatermark(mark_size=4, cells=2, density=0.5, opacity=0.4, intensity=1.0, seed=3)
    mark = attack.mark()
    assert mark.shape == (4, 4) and set(mark.unique().tolist()) <= {0.0, 1.0} and mark.sum() > 0
    assert torch.equal(mark[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1), mark)  # 2x2 cells of 2x2 px
    x = _rand(2, 3, 10, 10)
    y = attack.apply(x)
    region, expected = y[..., 6:, 6:], x[..., 6:, 6:] * (1 - 0.4 * mark) + 0.4 * mark
    torch.testing.assert_close(region, expected, atol=1e-6, rtol=0)
    assert torch.equal(region[..., mark == 0], x[..., 6:, 6:][..., mark == 0])
    _outside(y, x, slice(6, 10), slice(6, 10))
    assert torch.equal(TrojanWatermark(opacity=0.0).apply(x), x)


def test_trojan_mark_is_seeded_and_never_empty():
    assert not torch.equal(TrojanWatermark(seed=0).mark(), TrojanWatermark(seed=1).mark())
    assert TrojanWatermark(density=0.0).mark().sum() > 0
    with pytest.raises(ValueError, match="cells=9 must be <= mark_size=8"):
        TrojanWatermark(cells=9)


def test_wanet_strength_zero_is_identity():
    attack = WaNet(strength=0.0, seed=3)
    x = _rand(2, 3, 12, 17)
    torch.testing.assert_close(attack.apply(x), x, atol=1e-5, rtol=0)
    a = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(attack.apply(a), a)
    assert np.array_equal(np.asarray(attack.apply(Image.fromarray(a))), a)


def test_wanet_warps_a_ramp_by_its_field():
    # Bilinear sampling reproduces a linear ramp exactly, so a horizontal ramp read through the warp gives back the
    # field's x coordinate: out = (grid_x + 1) / 2 (align_corners=True).
    attack = WaNet(k=4, strength=2.0, seed=1)
    h, w = 10, 14
    ramp = torch.linspace(0, 1, w).expand(1, 1, h, w).contiguous()
    grid = attack.warp_field(h, w)
    assert grid.shape == (1, h, w, 2) and grid.abs().max() <= 1
    out = attack.apply(ramp)
    torch.testing.assert_close(out[0, 0], (grid[0, ..., 0] + 1) / 2, atol=1e-5, rtol=0)
    assert (out - ramp).abs().max() > 0.01  # it did move pixels
    constant = torch.full((1, 3, h, w), 0.3)
    torch.testing.assert_close(attack.apply(constant), constant)


def test_wanet_noise_samples():
    attack = WaNet(seed=2)
    x = _rand(3, 1, 16, 16)
    n0 = attack.apply_noise(x, call_seed=0)
    assert torch.equal(n0, attack.apply_noise(x, call_seed=0))
    assert not torch.equal(n0, attack.apply_noise(x, call_seed=1))
    assert not torch.allclose(n0, attack.apply(x), atol=1e-3)
    assert n0.shape == x.shape and n0.min() >= 0 and n0.max() <= 1


def test_wanet_poison_noise_rows(digits_dataset):
    out = WaNet(seed=0, cross_ratio=2.0).poison(digits_dataset, rate=0.1, target=3)
    poisoned, noise = np.asarray(out[POISONED_COLUMN]), np.asarray(out[NOISE_COLUMN])
    assert poisoned.sum() == 2 and noise.sum() == 4 and not (poisoned & noise).any()
    labels = np.asarray(digits_dataset["label"])
    assert (np.asarray(out["label"])[noise] == labels[noise]).all()  # noise rows keep their true label
    for i in np.flatnonzero(noise):
        assert not np.array_equal(np.asarray(out[int(i)]["image"]), np.asarray(digits_dataset[int(i)]["image"]))
    plain = WaNet(seed=0, noise_mode=False).poison(digits_dataset, rate=0.1, target=3)
    assert NOISE_COLUMN not in plain.column_names and plain[POISONED_COLUMN] == out[POISONED_COLUMN]


def test_non_default_configs_round_trip():
    for attack in (
        BadNets(patch_size=4, location=(1, -5), pattern="random", margin=2, seed=9),
        Blend(alpha=0.35, pattern="fixed_noise"),
        SIG(delta=0.05, frequency=4),
        Filter(style="gotham", strength=0.5),
        TrojanWatermark(mark_size=6, cells=3, density=0.7, opacity=0.25, intensity=0.5, location=[0, 0]),
        WaNet(k=8, strength=1, grid_rescale=0.98, noise_mode=False, cross_ratio=1),
    ):
        assert attack_from_dict(attack.to_dict()) == attack
    assert TrojanWatermark(location=[0, 0]).location == (0, 0)  # lists from JSON become tuples
    assert WaNet(strength=1).strength == 1.0 and isinstance(WaNet(strength=1).to_dict()["strength"], float)


def test_input_errors():
    attack = BadNets()
    with pytest.raises(ValueError, match=r"pixel values must be in \[0, 1\]"):
        attack.apply(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(ValueError, match="looks channels-last"):
        attack.apply(torch.rand(2, 8, 8, 3))
    with pytest.raises(TypeError, match="numpy images must be uint8"):
        attack.apply(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="is ambiguous"):
        attack.apply(np.zeros((5, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="PIL mode 'I;16'"):
        attack.apply(Image.new("I;16", (8, 8)))
    with pytest.raises(TypeError, match="expected images as a tensor"):
        attack.apply("not an image")
    with pytest.raises(ValueError, match=r"must be \(C, H, W\) or \(N, C, H, W\)"):
        attack.apply(torch.rand(8, 8))


def test_filter_known_answers():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Filter(strength=0.0).apply(x), x)
    sepia = Filter(style="sepia").apply(x)  # RGB: the colour matrix, per pixel
    r = (0.393 * x[:, 0] + 0.769 * x[:, 1] + 0.189 * x[:, 2]).clamp(0, 1)
    assert torch.allclose(sepia[:, 0], r, atol=1e-6)
    half = Filter(style="sepia", strength=0.5).apply(x)
    assert torch.allclose(half, (x + sepia) / 2, atol=1e-6)
    grey = torch.full((1, 1, 4, 4), 0.5)  # one channel: the tone curve, (1.4 (0.5 - 0.5) + 0.5 - 0.05) ** 1.1
    assert torch.allclose(Filter(style="gotham").apply(grey), torch.full_like(grey, 0.45**1.1))
    assert not Filter().seed_dependent and Filter(seed=1).apply(x).equal(Filter(seed=2).apply(x))
    with pytest.raises(ValueError):
        Filter(style="valencia")
