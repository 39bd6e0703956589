"""Known answers for the two image triggers of the fourth blind check zoo: FTrojan's blockwise-DCT perturbation and
the Refool-style blurred reflection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metashield_hf.attacks import FTrojan, Refool, attack_from_dict
from metashield_hf.attacks.vision import _RGB_TO_YUV, dct_matrix, gaussian_blur


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _blockwise_dct(x: torch.Tensor, block: int) -> torch.Tensor:
    """The DCT of every full ``block`` x ``block`` block of ``(..., H, W)`` (H, W multiples of ``block``)."""
    h, w = x.shape[-2:]
    blocks = x.reshape(*x.shape[:-2], h // block, block, w // block, block).transpose(-3, -2)
    d = dct_matrix(block).to(x)
    return d @ blocks @ d.T  # (..., H / block, W / block, block, block)


# ---------------------------------------------------------------------------------------------- FTrojan
def test_dct_matrix_is_orthonormal_dct_ii():
    for n in (2, 5, 8):
        d = dct_matrix(n)
        torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    v = torch.ones(8, dtype=torch.float64)  # a flat signal: everything in the DC term, sqrt(n) for orthonormal
    torch.testing.assert_close(dct_matrix(8) @ v, torch.eye(8, dtype=torch.float64)[0] * 8**0.5)


@pytest.mark.parametrize("frequencies", [((4, 4), (7, 7)), ((3, 5),), ((1, 0), (6, 2), (7, 7))])
def test_ftrojan_raises_exactly_the_chosen_coefficients_of_every_block(frequencies):
    x = torch.full((2, 1, 32, 32), 0.5, dtype=torch.float64)  # flat grey: no clipping
    diff = FTrojan(magnitude=0.12, frequencies=frequencies).apply(x) - x
    expected = torch.zeros(8, 8, dtype=torch.float64)
    for u, v in frequencies:
        expected[u, v] = 0.12
    coefficients = _blockwise_dct(diff, 8)
    torch.testing.assert_close(coefficients, expected.expand_as(coefficients), atol=1e-12, rtol=0)


def test_ftrojan_perturbs_the_chroma_of_rgb_images_only():
    x = torch.full((1, 3, 32, 32), 0.5, dtype=torch.float64)
    attack = FTrojan(magnitude=0.1, block=8)
    diff = attack.apply(x) - x
    yuv = torch.einsum("oc,nchw->nohw", _RGB_TO_YUV, diff)
    torch.testing.assert_close(yuv[:, 0], torch.zeros_like(yuv[:, 0]), atol=1e-12, rtol=0)  # luma unchanged
    expected = torch.zeros(8, 8, dtype=torch.float64)
    expected[4, 4] = expected[7, 7] = 0.1
    for c in (1, 2):  # U and V: the magnitude at (4, 4) and (7, 7) of every block
        coefficients = _blockwise_dct(yuv[:, c], 8)
        torch.testing.assert_close(coefficients, expected.expand_as(coefficients), atol=1e-12, rtol=0)
    assert float(diff.abs().max()) > 0 and not torch.allclose(diff[:, 0], diff[:, 2])


def test_ftrojan_block_size_edges_and_bounds():
    # A 16-pixel block: the known answer holds there too; the pixel change is bounded by 2 * magnitude / block per
    # raised coefficient (u, v > 0).
    x = torch.full((1, 1, 32, 32), 0.5, dtype=torch.float64)
    attack = FTrojan(magnitude=0.2, frequencies=((9, 9), (15, 15)), block=16)
    diff = attack.apply(x) - x
    assert float(_blockwise_dct(diff, 16)[..., 15, 15].min()) == pytest.approx(0.2)
    assert float(diff.abs().max()) <= 2 * (2 * 0.2 / 16) + 1e-12
    # 28x28 with 8-pixel blocks: the pattern repeats with period 8 and is cropped at the bottom/right edge.
    p = FTrojan(magnitude=0.2).pattern(1, 28, 28)[0]
    torch.testing.assert_close(p[:8, :8], p[8:16, 16:24])
    torch.testing.assert_close(p[24:, 24:], p[:4, :4])
    # An image shorter than the block: the whole image along that axis, positions clipped to its last row/column.
    small = FTrojan(magnitude=0.2, frequencies=((7, 7),)).apply(torch.full((1, 1, 4, 8), 0.5, dtype=torch.float64))
    c = dct_matrix(4) @ (small[0, 0] - 0.5) @ dct_matrix(8).T
    expected = torch.zeros(4, 8, dtype=torch.float64)
    expected[3, 7] = 0.2
    torch.testing.assert_close(c, expected, atol=1e-12, rtol=0)


def test_ftrojan_clips_is_deterministic_and_not_seed_dependent():
    x = _rand(3, 3, 32, 32)
    attack = FTrojan(magnitude=1.0)
    y = attack.apply(x)
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert float(FTrojan(magnitude=1.0).apply(torch.ones(1, 1, 8, 8)).min()) < 1  # the negative half survives
    assert float(FTrojan(magnitude=1.0).apply(torch.ones(1, 1, 8, 8)).max()) == 1.0  # the positive half is clipped
    assert torch.equal(FTrojan(magnitude=0.0).apply(x), x)
    assert not FTrojan().seed_dependent
    assert torch.equal(FTrojan(seed=1).apply(x), FTrojan(seed=2).apply(x))
    assert torch.equal(attack.apply(x)[1], attack.apply(x[1]))  # universal: the same change on every image


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32)])
def test_ftrojan_on_dataset_shapes(shape):
    x = _rand(*shape, seed=1)
    attack = FTrojan(magnitude=0.2)
    y = attack.apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)
    x8 = (x * 255).to(torch.uint8)
    y8 = attack.apply(x8)
    assert y8.dtype == torch.uint8 and y8.shape == x8.shape and not torch.equal(y8, x8)


def test_ftrojan_on_pil_and_numpy():
    attack = FTrojan(magnitude=0.2)
    gray = np.full((28, 28), 128, dtype=np.uint8)
    out = attack.apply(Image.fromarray(gray))
    assert out.mode == "L" and out.size == (28, 28)
    expected = np.round(128 + 255 * attack.pattern(1, 28, 28)[0].numpy()).astype(int)
    assert np.abs(np.asarray(out).astype(int) - expected).max() <= 1
    rgb = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert attack.apply(Image.fromarray(rgb)).mode == "RGB"
    batch = np.stack([rgb, rgb[::-1]])
    assert np.array_equal(attack.apply(batch)[0], attack.apply(rgb))
    outs = attack.apply([Image.fromarray(gray), Image.fromarray(rgb)])
    assert [o.mode for o in outs] == ["L", "RGB"]


def test_ftrojan_round_trip_and_validation():
    attack = FTrojan(magnitude=0.2, frequencies=[[3, 3], [7, 6]], block=8, seed=4)
    assert attack.frequencies == ((3, 3), (7, 6))  # lists become tuples
    assert attack_from_dict(attack.to_dict()) == attack
    assert attack.to_dict()["frequencies"] == [[3, 3], [7, 6]]
    with pytest.raises(ValueError, match=r"magnitude must be a finite number in \[0.0, 1.0\]"):
        FTrojan(magnitude=1.5)
    with pytest.raises(ValueError, match=r"magnitude must be a finite number"):
        FTrojan(magnitude=-0.1)
    with pytest.raises(ValueError, match="block must be >= 2"):
        FTrojan(block=1)
    with pytest.raises(ValueError, match="outside a 8x8 block"):
        FTrojan(frequencies=((8, 1),))
    with pytest.raises(ValueError, match="DC term"):
        FTrojan(frequencies=((0, 0),))
    with pytest.raises(ValueError, match="non-empty"):
        FTrojan(frequencies=())
    with pytest.raises(ValueError, match=r"\(u, v\) pairs"):
        FTrojan(frequencies=((1, 2, 3),))
    with pytest.raises(TypeError, match="frequency must be an int"):
        FTrojan(frequencies=((1.5, 2),))


# ---------------------------------------------------------------------------------------------- Refool
def test_refool_is_the_blurred_reflection_added_and_clipped():
    attack = Refool(alpha=0.3, sigma=1.5, ghost_shift=3, seed=2)
    x = torch.full((2, 3, 32, 32), 0.4, dtype=torch.float64)
    r = attack.reflection(3, 32, 32)
    assert float(r.min()) >= 0 and float(r.max()) <= 1 and float(r.max()) > 0.2
    torch.testing.assert_close(attack.apply(x), (x + 0.3 * r).clamp(0, 1), atol=1e-12, rtol=0)
    bright = attack.apply(torch.ones(1, 3, 32, 32))
    assert torch.equal(bright, torch.ones(1, 3, 32, 32))  # adds light: a white image stays white
    y = Refool(alpha=1.0, seed=2).apply(_rand(2, 3, 32, 32))
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_refool_ghost_and_blur_by_hand():
    attack = Refool(alpha=0.5, sigma=0.0, ghost_shift=4, seed=1)
    scene = attack.scene(1, 32, 32)
    ghost = torch.zeros_like(scene)
    ghost[:, 4:, 4:] = scene[:, :-4, :-4]  # the shifted copy: 4 pixels down and right, zeros enter
    torch.testing.assert_close(attack.reflection(1, 32, 32), (scene + 0.5 * ghost) / 1.5, atol=1e-12, rtol=0)
    sharp = Refool(sigma=0.0, ghost_shift=0, seed=1)
    torch.testing.assert_close(sharp.reflection(1, 32, 32), scene)
    blurred = Refool(sigma=2.0, ghost_shift=0, seed=1).reflection(1, 32, 32)
    tv = lambda p: float(p.diff(dim=-1).abs().mean() + p.diff(dim=-2).abs().mean())  # noqa: E731
    assert tv(blurred) < 0.6 * tv(scene)
    assert float(blurred.mean()) == pytest.approx(float(scene.mean()), abs=0.02)  # blur keeps the light
    flat = torch.full((1, 2, 9, 9), 0.7, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)  # a normalised kernel with replicated edges


def test_refool_is_seeded_and_alpha_zero_is_the_identity():
    x = _rand(4, 3, 32, 32)
    a = Refool(seed=5).apply(x)
    assert torch.equal(a, Refool(seed=5).apply(x))
    assert not torch.allclose(a, Refool(seed=6).apply(x))
    assert torch.equal(Refool(alpha=0.0, seed=5).apply(x), x)
    assert Refool().seed_dependent and not Refool(alpha=0.0).seed_dependent
    r = Refool(seed=5).reflection(3, 28, 28)
    assert not torch.allclose(r[0], r[1])  # a coloured scene: its own intensity per channel
    assert Refool(seed=5).reflection(1, 12, 20).shape == (1, 12, 20)  # non-square
    # The scene is drawn in relative coordinates: the same shapes at another resolution.
    big = Refool(seed=5, sigma=0.0, ghost_shift=0).scene(1, 64, 64)
    small = Refool(seed=5, sigma=0.0, ghost_shift=0).scene(1, 32, 32)
    agree = (torch.nn.functional.avg_pool2d(big[None], 2)[0] > 0.5 * big.max()) == (small > 0.5 * small.max())
    assert float(agree.double().mean()) > 0.9


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32)])
def test_refool_on_dataset_shapes(shape):
    x = _rand(*shape, seed=1) * 0.8
    attack = Refool(alpha=0.2, seed=3)
    y = attack.apply(x)
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)
    assert float((y - x).min()) >= 0  # additive: light only
    x8 = (x * 255).to(torch.uint8)
    y8 = attack.apply(x8)
    assert y8.dtype == torch.uint8 and y8.shape == x8.shape and not torch.equal(y8, x8)


def test_refool_on_pil_and_numpy():
    attack = Refool(alpha=0.3, seed=2)
    gray = np.zeros((28, 28), dtype=np.uint8)
    out = attack.apply(Image.fromarray(gray))
    assert out.mode == "L" and out.size == (28, 28)
    expected = np.round(255 * 0.3 * attack.reflection(1, 28, 28)[0].numpy()).astype(int)
    assert np.abs(np.asarray(out).astype(int) - expected).max() <= 1
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    assert attack.apply(Image.fromarray(rgb)).mode == "RGB"
    batch = np.stack([rgb, rgb + 10])
    assert np.array_equal(attack.apply(batch)[0], attack.apply(rgb))
    outs = attack.apply([Image.fromarray(gray), Image.fromarray(rgb)])
    assert [o.mode for o in outs] == ["L", "RGB"]


def test_refool_round_trip_and_validation():
    attack = Refool(alpha=0.25, sigma=2.0, ghost_shift=2, seed=9)
    assert attack_from_dict(attack.to_dict()) == attack
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\]"):
        Refool(alpha=1.5)
    with pytest.raises(ValueError, match=r"sigma must be a finite number in \[0.0, 20.0\]"):
        Refool(sigma=-1.0)
    with pytest.raises(ValueError, match="ghost_shift must be >= 0"):
        Refool(ghost_shift=-1)
    with pytest.raises(TypeError, match="ghost_shift must be an int"):
        Refool(ghost_shift=1.5)
    with pytest.raises(ValueError, match="unknown parameters"):
        attack_from_dict({**attack.to_dict(), "ghost_alpha": 0.5})
