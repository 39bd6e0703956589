"""Known answers for the two image triggers of the third blind check zoo: BPP's dithered quantisation and the
low-frequency pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metashield_hf.attacks import BPP, LowFrequency, attack_from_dict


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _total_variation(p: torch.Tensor) -> float:
    return float(p.diff(dim=-1).abs().mean() + p.diff(dim=-2).abs().mean())


# ---------------------------------------------------------------------------------------------- BPP
@pytest.mark.parametrize("bits", [1, 2, 3, 5])
@pytest.mark.parametrize("dither", [True, False])
def test_bpp_has_at_most_two_to_the_bits_levels_per_channel(bits, dither):
    x = _rand(4, 3, 16, 12)
    y = BPP(bits=bits, dither=dither).apply(x)
    top = 2**bits - 1
    for c in range(3):
        values = y[:, c].unique()
        assert len(values) <= 2**bits
        torch.testing.assert_close(values * top, (values * top).round(), atol=1e-5, rtol=0)  # on the lattice k / top
    y8 = BPP(bits=bits, dither=dither).apply((x * 255).to(torch.uint8))
    assert all(len(y8[:, c].unique()) <= 2**bits for c in range(3))


def test_bpp_without_dither_is_plain_rounding():
    x = _rand(2, 3, 8, 8)
    torch.testing.assert_close(BPP(bits=3, dither=False).apply(x), (x * 7).round() / 7, atol=1e-6, rtol=0)


def test_bpp_dither_differs_from_rounding_and_keeps_the_local_mean():
    x = _rand(2, 3, 16, 16)
    assert not torch.equal(BPP(bits=3).apply(x), BPP(bits=3, dither=False).apply(x))
    flat = torch.full((1, 1, 16, 16), 0.25)  # one bit: rounding gives all black, error diffusion ~25 % white dots
    assert float(BPP(bits=1, dither=False).apply(flat).max()) == 0.0
    assert abs(float(BPP(bits=1).apply(flat).mean()) - 0.25) < 0.03


def test_bpp_floyd_steinberg_by_hand():
    # A 0.5 row at one bit: 0.5 -> 0 (round half to even), the next gets 0.5 + 7/16 * 0.5 = 0.71875 -> 1, and so on.
    row = BPP(bits=1).apply(torch.full((1, 1, 1, 4), 0.5))
    assert torch.equal(row, torch.tensor([[[[0.0, 1.0, 0.0, 1.0]]]]))
    # 2x2: (1, 0) gets 5/16 * 0.5 from (0, 0) and 3/16 * -0.28125 from (0, 1): 0.6035 -> 1; then (1, 1) ends at 0.27.
    square = BPP(bits=1).apply(torch.full((1, 1, 2, 2), 0.5))
    assert torch.equal(square, torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]]))


def test_bpp_on_pil_and_numpy():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    out = BPP(bits=2).apply(gray)
    assert out.mode == "L" and set(np.unique(np.asarray(out))) <= {0, 85, 170, 255}
    rgb = np.asarray(Image.fromarray(np.stack([np.asarray(gray)] * 3, axis=-1)))
    assert np.array_equal(BPP(bits=2).apply(rgb)[..., 0], np.asarray(out))  # one channel at a time


def test_bpp_is_not_seed_dependent_and_validates():
    x = _rand(2, 3, 8, 8)
    assert not BPP().seed_dependent and torch.equal(BPP(seed=1).apply(x), BPP(seed=2).apply(x))
    assert attack_from_dict(BPP(bits=2, dither=False).to_dict()) == BPP(bits=2, dither=False)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        BPP(bits=0)
    with pytest.raises(ValueError, match="bits must be <= 7"):
        BPP(bits=8)
    with pytest.raises(TypeError, match="dither must be a bool"):
        BPP(dither=1)


# ---------------------------------------------------------------------------------------------- LowFrequency
def test_low_frequency_is_bounded_by_the_amplitude():
    x = torch.full((2, 3, 32, 32), 0.5)
    for amplitude in (0.03, 0.06, 0.2):
        diff = LowFrequency(amplitude=amplitude, seed=3).apply(x) - x
        assert float(diff.abs().max()) == pytest.approx(amplitude, abs=1e-6)
        assert torch.equal(diff[0], diff[1])  # universal: the same pattern on every image
    assert torch.equal(LowFrequency(amplitude=0.0).apply(x), x)
    assert float(LowFrequency(amplitude=0.5).apply(torch.ones(1, 1, 8, 8)).max()) == 1.0  # clipped


def test_low_frequency_is_smooth():
    for seed in range(4):
        p = LowFrequency(amplitude=0.06, seed=seed).pattern(3, 32, 32)
        noise = (_rand(3, 32, 32, seed=seed) * 2 - 1) * 0.06  # a random pattern of the same amplitude
        assert _total_variation(p) < 0.2 * _total_variation(noise)
        power = torch.fft.fft2(p).abs() ** 2
        k = torch.fft.fftfreq(32).abs() * 32
        high = k[:, None].maximum(k[None, :]) > 8  # above a quarter of the sampling rate
        # What high power there is comes from the FFT wrapping the (unequal) borders; white noise holds ~3/4 there.
        assert float(power[:, high].sum() / power.sum()) < 0.1
    coarse = LowFrequency(grid=4, seed=0).pattern(1, 32, 32)
    fine = LowFrequency(grid=16, seed=0).pattern(1, 32, 32)
    assert _total_variation(coarse) < _total_variation(fine)


def test_low_frequency_is_seeded():
    a = LowFrequency(seed=5).pattern(3, 28, 28)
    assert torch.equal(a, LowFrequency(seed=5).pattern(3, 28, 28))
    assert not torch.allclose(a, LowFrequency(seed=6).pattern(3, 28, 28))
    assert not torch.allclose(a[0], a[1])  # its own pattern per channel
    assert LowFrequency().seed_dependent and not LowFrequency(amplitude=0.0).seed_dependent
    assert LowFrequency(seed=5).pattern(1, 12, 20).shape == (1, 12, 20)  # non-square


def test_low_frequency_on_pil_and_numpy():
    attack = LowFrequency(amplitude=0.1, seed=2)
    gray = np.full((28, 28), 128, dtype=np.uint8)
    out = attack.apply(Image.fromarray(gray))
    assert out.mode == "L" and out.size == (28, 28)
    diff = np.asarray(out).astype(int) - 128
    assert np.abs(diff).max() <= round(0.1 * 255) and np.abs(diff).max() >= round(0.1 * 255) - 1
    batch = np.full((2, 28, 28, 3), 128, dtype=np.uint8)
    assert np.array_equal(attack.apply(batch)[0], attack.apply(batch[0]))


def test_low_frequency_validates():
    assert attack_from_dict(LowFrequency(amplitude=0.1, grid=3, seed=4).to_dict()) == LowFrequency(
        amplitude=0.1, grid=3, seed=4
    )
    with pytest.raises(ValueError, match="grid must be >= 2"):
        LowFrequency(grid=1)
    with pytest.raises(ValueError, match=r"amplitude must be a finite number in \[0.0, 1.0\]"):
        LowFrequency(amplitude=1.5)
