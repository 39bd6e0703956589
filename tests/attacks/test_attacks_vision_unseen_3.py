"""Known answers for the two image triggers of the fifth blind check zoo: a rotation of the whole image and Poison
Ink's coloured edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metashield_hf.attacks import ATTACKS, PoisonInk, Rotation, attack_from_dict
from metashield_hf.attacks.vision import sobel_edges


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _step(channels: int = 1, size: int = 16, column: int = 8, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    """``(1, C, size, size)``: ``low`` left of ``column``, ``high`` from it on (a vertical edge)."""
    x = torch.full((1, channels, size, size), low, dtype=torch.float64)
    x[..., column:] = high
    return x


# ---------------------------------------------------------------------------------------------- Rotation
def test_rotation_by_zero_is_the_identity():
    x = _rand(3, 3, 16, 12)
    assert torch.equal(Rotation(angle=0.0).apply(x), x)
    assert torch.equal(Rotation(angle=0.0, fill="edge").apply(x), x)


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2), (-180.0, 2)])
@pytest.mark.parametrize("fill", ["zero", "edge"])
def test_rotation_by_right_angles_is_rot90_counter_clockwise(angle, k, fill):
    x = _rand(2, 3, 9, 9, seed=1)  # odd and even sides: the centre is a pixel or a corner
    torch.testing.assert_close(
        Rotation(angle=angle, fill=fill).apply(x), torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0
    )
    y = _rand(1, 1, 8, 8, seed=2)
    torch.testing.assert_close(
        Rotation(angle=angle, fill=fill).apply(y), torch.rot90(y, k, dims=(-2, -1)), atol=1e-5, rtol=0
    )


def test_rotation_direction_matches_pil():
    # A white pixel at the top-right: turned 90 degrees counter-clockwise (as displayed) it lands at the top-left.
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 4] = 1.0
    out = Rotation(angle=90.0).apply(x)[0, 0]
    assert out.argmax().item() == 0 and float(out[0, 0]) == pytest.approx(1.0, abs=1e-5)
    a = np.zeros((5, 5), dtype=np.uint8)
    a[0, 4] = 255
    pil = np.asarray(Image.fromarray(a).rotate(90))
    assert np.array_equal(np.asarray(Rotation(angle=90.0).apply(Image.fromarray(a))), pil)


def test_rotation_fill_and_non_square():
    ones = torch.ones(1, 1, 16, 16)
    zero = Rotation(angle=45.0, fill="zero").apply(ones)[0, 0]
    edge = Rotation(angle=45.0, fill="edge").apply(ones)[0, 0]
    assert float(zero[0, 0]) == 0.0 and float(zero[8, 8]) == pytest.approx(1.0)  # the uncovered corner is black
    torch.testing.assert_close(edge, torch.ones(16, 16))  # border fill: a flat image stays flat
    # Non-square: 180 degrees is the flip of both axes at any aspect (pixel units, not [-1, 1] units).
    x = _rand(2, 3, 12, 20, seed=3)
    torch.testing.assert_close(Rotation(angle=180.0).apply(x), x.flip(-1, -2), atol=1e-5, rtol=0)
    # A 90-degree turn of a non-square image keeps its shape; the content that fits is the rot90'd centre crop.
    y = _rand(1, 1, 6, 10, seed=4)
    out = Rotation(angle=90.0).apply(y)
    assert out.shape == y.shape
    torch.testing.assert_close(out[..., 2:8], torch.rot90(y[..., 2:8], 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotation_is_deterministic_and_not_seed_dependent():
    x = _rand(3, 1, 28, 28)
    assert not Rotation().seed_dependent
    assert torch.equal(Rotation(angle=30.0, seed=1).apply(x), Rotation(angle=30.0, seed=2).apply(x))
    assert torch.equal(Rotation(angle=30.0).apply(x)[1], Rotation(angle=30.0).apply(x[1]))
    # 30 then -30 gives back the centre of the image up to bilinear smoothing.
    smooth = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
    back = Rotation(angle=-30.0).apply(Rotation(angle=30.0).apply(smooth))
    assert float((back - smooth)[..., 8:20, 8:20].abs().max()) < 0.1


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32)])
@pytest.mark.parametrize("attack", [Rotation(angle=45.0), PoisonInk(alpha=0.5)], ids=["rotation", "poison_ink"])
def test_new_attacks_on_dataset_shapes(attack, shape):
    x = _rand(*shape, seed=1)
    y = attack.apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)
    x8 = (x * 255).to(torch.uint8)
    y8 = attack.apply(x8)
    assert y8.dtype == torch.uint8 and y8.shape == x8.shape and not torch.equal(y8, x8)
    if isinstance(attack, Rotation):  # a quarter turn of uint8 pixels is exact after rounding
        assert torch.equal(Rotation(angle=90.0).apply(x8), torch.rot90(x8, 1, dims=(-2, -1)))


def test_rotation_round_trip_and_validation():
    attack = Rotation(angle=-45, fill="edge", seed=3)
    assert attack.angle == -45.0 and isinstance(attack.angle, float)
    assert attack_from_dict(attack.to_dict()) == attack
    assert ATTACKS.build("rotation", angle=30.0) == Rotation(angle=30.0)
    with pytest.raises(ValueError, match=r"angle must be a finite number in \[-180.0, 180.0\], got 270.0"):
        Rotation(angle=270.0)
    with pytest.raises(ValueError, match="angle must be a finite number"):
        Rotation(angle=float("nan"))
    with pytest.raises(ValueError, match=r"fill must be one of \['zero', 'edge'\], got 'reflect'"):
        Rotation(fill="reflect")
    with pytest.raises(TypeError, match="angle must be a number"):
        Rotation(angle="90")


# ---------------------------------------------------------------------------------------------- Poison Ink
def test_sobel_edges_known_answer():
    assert torch.equal(sobel_edges(torch.full((2, 3, 8, 8), 0.6)), torch.zeros(2, 1, 8, 8))
    e = sobel_edges(_step(low=0.2, high=0.8))[0, 0]
    torch.testing.assert_close(e[:, 7:9], torch.full((16, 2), 0.6, dtype=torch.float64))  # step height, either side
    assert float(e[:, :7].abs().max()) < 1e-12 and float(e[:, 9:].abs().max()) < 1e-12
    # RGB: the BT.601 luma carries the edge; a step in blue alone is 0.114 as strong.
    rgb = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    rgb[:, 2, :, 8:] = 1.0
    assert float(sobel_edges(rgb).max()) == pytest.approx(0.114)


@pytest.mark.parametrize("channels", [1, 3])
def test_poison_ink_leaves_a_constant_image_unchanged(channels):
    x = torch.full((2, channels, 16, 16), 0.37)
    assert torch.equal(PoisonInk(alpha=1.0, threshold=0.01).apply(x), x)


def test_poison_ink_inks_only_the_pixels_either_side_of_an_edge():
    x = _step(channels=3, column=8)
    attack = PoisonInk(alpha=0.5, colour=(1.0, 0.0, 0.0), threshold=0.25)
    y = attack.apply(x)
    changed = (y != x).any(dim=1)[0]
    assert changed[:, 7:9].all() and not changed[:, :7].any() and not changed[:, 9:].any()
    ink = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(y[0, :, :, 7], 0.5 * x[0, :, :, 7] + 0.5 * ink)  # half-way to red
    torch.testing.assert_close(y[0, :, :, 8], 0.5 * x[0, :, :, 8] + 0.5 * ink)


def test_poison_ink_threshold_and_grey_ink():
    weak = _step(channels=1, low=0.4, high=0.6)  # edge strength 0.2
    assert torch.equal(PoisonInk(threshold=0.25).apply(weak), weak)
    assert not torch.equal(PoisonInk(threshold=0.15).apply(weak), weak)
    # One channel: the ink is the luma of the colour (pure green: 0.587).
    x = _step(channels=1, low=0.0, high=1.0)
    y = PoisonInk(alpha=1.0, colour=(0.0, 1.0, 0.0)).apply(x)[0, 0]
    torch.testing.assert_close(y[:, 7:9], torch.full((16, 2), 0.587, dtype=torch.float64))
    assert torch.equal(y[:, :7], x[0, 0, :, :7]) and torch.equal(y[:, 9:], x[0, 0, :, 9:])
    assert torch.equal(PoisonInk(alpha=0.0).apply(_rand(2, 3, 8, 8)), _rand(2, 3, 8, 8))


def test_poison_ink_follows_the_image_and_is_not_seed_dependent():
    x = _rand(4, 3, 32, 32)
    attack = PoisonInk()
    assert not attack.seed_dependent
    assert torch.equal(PoisonInk(seed=1).apply(x), PoisonInk(seed=2).apply(x))
    masks = attack.mask(x)
    assert masks.shape == (4, 1, 32, 32) and not torch.equal(masks[0], masks[1])  # each image its own edges
    assert torch.equal(attack.apply(x)[2], attack.apply(x[2]))


def test_poison_ink_on_pil():
    gray = np.zeros((16, 16), dtype=np.uint8)
    gray[:, 8:] = 255
    out = PoisonInk(alpha=1.0, colour=(1.0, 1.0, 1.0)).apply(Image.fromarray(gray))
    assert out.mode == "L" and np.array_equal(np.asarray(out)[:, 7], np.full(16, 255))
    rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
    red = np.asarray(PoisonInk(alpha=1.0, colour=(1.0, 0.0, 0.0)).apply(rgb))
    assert red[:, 8].tolist() == [[255, 0, 0]] * 16 and red[:, 0].tolist() == [[0, 0, 0]] * 16


def test_poison_ink_round_trip_and_validation():
    attack = PoisonInk(alpha=0.3, colour=[0.0, 1.0, 0.5], threshold=0.1, seed=4)
    assert attack.colour == (0.0, 1.0, 0.5)  # a list becomes a tuple
    assert attack_from_dict(attack.to_dict()) == attack
    assert ATTACKS.build("poison_ink", alpha=0.3) == PoisonInk(alpha=0.3)
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\], got 1.5"):
        PoisonInk(alpha=1.5)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        PoisonInk(threshold=0.0)
    with pytest.raises(ValueError, match=r"threshold must be a finite number in \[0.0, 1.0\]"):
        PoisonInk(threshold=2.0)
    with pytest.raises(ValueError, match="colour must be an RGB triple"):
        PoisonInk(colour=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"colour\[i\] must be a finite number in \[0.0, 1.0\]"):
        PoisonInk(colour=(1.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="unknown parameters"):
        attack_from_dict({**attack.to_dict(), "dilate": 1})
