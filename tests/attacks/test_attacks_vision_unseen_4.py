"""Known answers for the two image triggers of the sixth blind check zoo: FIBA's low-frequency amplitude blend and
Adap-Blend's partial blend pieces with label-keeping covers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metashield_hf.attacks import (
    ATTACKS,
    FIBA,
    NOISE_COLUMN,
    POISONED_COLUMN,
    AdaptiveBlend,
    Blend,
    attack_from_dict,
)


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mid_grey(*shape: int, seed: int = 0) -> torch.Tensor:
    """Mid-grey with a faint texture (float64): far from 0 and 1, so no clamp bites, and no zero in its spectrum."""
    return 0.5 + 0.05 * (2 * _rand(*shape, seed=seed, dtype=torch.float64) - 1)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x, dim=(-2, -1)), dim=(-2, -1))


def _square(attack: FIBA, h: int, w: int) -> torch.Tensor:
    h1, h2, w1, w2 = attack.band(h, w)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[h1:h2, w1:w2] = True
    return inside


# ---------------------------------------------------------------------------------------------- FIBA
@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (3, 3, 32, 32), (2, 3, 12, 20)])
def test_fiba_alpha_zero_is_the_identity(shape):
    x = _rand(*shape)
    torch.testing.assert_close(FIBA(alpha=0.0, beta=0.5).apply(x), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(FIBA(alpha=0.0).apply(x), x, atol=1e-5, rtol=0)


def test_fiba_band_is_the_centred_low_frequency_square():
    assert FIBA(beta=0.1).band(32, 32) == (13, 20, 13, 20)  # b = 3: frequencies -3..3 about index 16
    assert FIBA(beta=0.1).band(28, 28) == (12, 17, 12, 17)  # b = 2 about index 14
    assert FIBA(beta=0.0).band(28, 28) == (14, 15, 14, 15)  # the zero frequency alone
    assert FIBA(beta=0.15).band(12, 20) == (5, 8, 9, 12)  # b from the shorter side
    assert FIBA(beta=0.5).band(32, 32) == (0, 32, 0, 32)  # the whole spectrum


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32)])
def test_fiba_keeps_the_phase_and_the_high_frequencies(shape):
    x = _mid_grey(*shape, seed=1)
    attack = FIBA(alpha=0.3, beta=0.15, seed=2)
    y = attack.apply(x)
    assert float(y.min()) > 0 and float(y.max()) < 1, "the clamp must not bite for this test"
    sx, sy = _spectrum(x), _spectrum(y)
    inside = _square(attack, *shape[-2:])
    # Outside the low-frequency square the spectrum is the input's (amplitude and phase).
    assert float((sy - sx)[..., ~inside].abs().max()) < 1e-9
    # Inside, the amplitude moved but the phase did not: unit phasors equal.
    assert float((sy.abs() - sx.abs())[..., inside].abs().max()) > 1e-3
    torch.testing.assert_close(sy / sy.abs(), sx / sx.abs(), atol=1e-9, rtol=0)
    # The new amplitude inside is the blend of the input's and the trigger image's.
    trigger = _spectrum(attack.trigger_image(*shape[1:])).abs().expand_as(sx)
    expected = 0.7 * sx.abs() + 0.3 * trigger
    torch.testing.assert_close(sy.abs()[..., inside], expected[..., inside], atol=1e-9, rtol=0)


def test_fiba_beta_zero_shifts_only_the_mean():
    # Only the zero frequency is mixed: every pixel moves by alpha * (trigger mean - image mean).
    x = _mid_grey(2, 3, 32, 32, seed=3)
    attack = FIBA(alpha=0.4, beta=0.0, seed=5)
    t = attack.trigger_image(3, 32, 32)
    shift = 0.4 * (t.mean(dim=(-2, -1)) - x.mean(dim=(-2, -1)))
    torch.testing.assert_close(attack.apply(x), x + shift[..., None, None], atol=1e-12, rtol=0)


def test_fiba_alpha_one_full_band_has_the_trigger_amplitude():
    x = _mid_grey(1, 1, 16, 16, seed=4)
    attack = FIBA(alpha=1.0, beta=0.5, seed=1)
    t = attack.trigger_image(1, 16, 16)
    y = torch.fft.ifft2(torch.polar(torch.fft.fft2(t).abs(), torch.fft.fft2(x).angle())).real.clamp(0, 1)
    torch.testing.assert_close(attack.apply(x), y, atol=1e-12, rtol=0)


def test_fiba_trigger_image_is_smooth_seeded_and_any_size():
    a = FIBA(seed=1).trigger_image(3, 32, 32)
    assert a.shape == (3, 32, 32) and float(a.min()) >= 0 and float(a.max()) < 1
    assert torch.equal(a, FIBA(seed=1).trigger_image(3, 32, 32)) and not torch.equal(
        a, FIBA(seed=2).trigger_image(3, 32, 32)
    )
    assert FIBA(seed=1).trigger_image(1, 28, 28).shape == (1, 28, 28)
    assert float((a[..., 1:, :] - a[..., :-1, :]).abs().max()) < 0.25  # bilinear from an 8x8 lattice: smooth


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32)])
def test_fiba_depends_on_the_seed_and_is_deterministic(shape):
    x = _rand(*shape, seed=1)
    out = FIBA(seed=3).apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    assert torch.equal(out, FIBA(seed=3).apply(x))
    assert float((out - FIBA(seed=4).apply(x)).abs().max()) > 1e-3
    assert FIBA().seed_dependent and not FIBA(alpha=0.0).seed_dependent
    x8 = (x * 255).to(torch.uint8)
    assert not torch.equal(FIBA(alpha=0.3).apply(x8), x8)


def test_fiba_round_trip_and_validation():
    attack = FIBA(alpha=0.3, beta=0.15, seed=4)
    assert attack_from_dict(attack.to_dict()) == attack
    assert ATTACKS.get("fiba") is FIBA and ATTACKS.build("fiba", alpha=0.3) == FIBA(alpha=0.3)
    assert FIBA(alpha=1, beta=0).alpha == 1.0 and isinstance(FIBA(alpha=1).alpha, float)
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\], got 1.5"):
        FIBA(alpha=1.5)
    with pytest.raises(ValueError, match=r"beta must be a finite number in \[0.0, 0.5\], got 0.6"):
        FIBA(beta=0.6)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        FIBA(beta=-0.1)
    with pytest.raises(TypeError, match="alpha must be a number"):
        FIBA(alpha="0.1")


# ---------------------------------------------------------------------------------------------- Adap-Blend
@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 32, 32), (2, 3, 12, 20)])
def test_adaptive_blend_test_trigger_is_the_full_blend_at_test_alpha(shape):
    x = _rand(*shape, seed=2)
    attack = AdaptiveBlend(test_alpha=0.25, train_alpha=0.1, seed=3)
    pattern = attack.pattern_image(*shape[1:])
    torch.testing.assert_close(attack.apply(x), 0.75 * x + 0.25 * pattern, atol=1e-6, rtol=0)
    assert torch.equal(attack.apply(x), Blend(alpha=0.25, seed=3).apply(x))
    assert torch.equal(AdaptiveBlend(test_alpha=0.0).apply(x), x)


def _pieces_changed(before: torch.Tensor, after: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k * k)`` bools: which grid pieces of each image changed (the grid of ``AdaptiveBlend.piece_mask``)."""
    n, _, h, w = before.shape
    rows = [h * i // k for i in range(k + 1)]
    cols = [w * i // k for i in range(k + 1)]
    diff = (after != before).any(dim=1)
    return torch.stack(
        [
            diff[:, rows[r] : rows[r + 1], cols[c] : cols[c + 1]].flatten(1).any(dim=1)
            for r in range(k)
            for c in range(k)
        ],
        dim=1,
    )


@pytest.mark.parametrize("shape", [(6, 1, 28, 28), (6, 3, 32, 32)])
def test_adaptive_blend_training_trigger_carries_only_some_pieces(shape):
    x = _rand(*shape, seed=4, dtype=torch.float64)
    attack = AdaptiveBlend(train_alpha=0.15, pieces=16, mask_rate=0.5, seed=1)
    y = attack.apply_train(x, call_seed=3)
    changed = _pieces_changed(x, y, 4)
    assert changed.sum(dim=1).tolist() == [8] * shape[0]  # round(0.5 * 16) pieces left out, 8 blended
    assert len({tuple(row.tolist()) for row in changed}) > 1  # each image its own random pieces
    # Inside a kept piece: the blend at train_alpha; elsewhere: the input, bit for bit.
    full = 0.85 * x + 0.15 * attack.pattern_image(*shape[1:]).double()
    mask = (y != x).any(dim=1, keepdim=True).expand_as(x)
    torch.testing.assert_close(y[mask], full[mask], atol=1e-12, rtol=0)
    assert torch.equal(y[~mask], x[~mask])
    # The same call gives the same masks; another call_seed or seed gives others.
    assert torch.equal(y, attack.apply_train(x, call_seed=3))
    assert not torch.equal(y, attack.apply_train(x, call_seed=4))
    assert torch.equal(attack.apply_noise(x, call_seed=3), y)  # the zoo builder's cover hook


def test_adaptive_blend_mask_rate_and_grid():
    x = _rand(3, 3, 32, 32, seed=5)
    kept = lambda a: _pieces_changed(x, a.apply_train(x), int(np.sqrt(a.pieces))).sum(dim=1).tolist()  # noqa: E731
    assert kept(AdaptiveBlend(mask_rate=0.0)) == [16, 16, 16]  # no piece left out
    assert kept(AdaptiveBlend(mask_rate=0.25)) == [12, 12, 12]
    assert kept(AdaptiveBlend(pieces=4, mask_rate=0.5)) == [2, 2, 2]
    assert kept(AdaptiveBlend(pieces=9, mask_rate=0.5)) == [5, 5, 5]  # round(4.5) = 4 left out
    m = AdaptiveBlend(pieces=9).piece_mask(torch.tensor([0, 4, 8]), 12, 20)  # a 3x3 grid on a non-square image
    expected = torch.zeros(12, 20, dtype=torch.float64)
    expected[0:4, 0:6] = expected[4:8, 6:13] = expected[8:12, 13:20] = 1.0
    assert torch.equal(m, expected)
    # With mask_rate 0 the training trigger is the full blend at train_alpha.
    torch.testing.assert_close(
        AdaptiveBlend(mask_rate=0.0, train_alpha=0.3, seed=2).apply_train(x), Blend(alpha=0.3, seed=2).apply(x)
    )


def test_adaptive_blend_poison_covers_keep_their_labels(digits_dataset):
    attack = AdaptiveBlend(cover_rate=0.5, seed=2)
    out = attack.poison(digits_dataset, rate=0.4, target=1)
    poisoned, covers = np.asarray(out[POISONED_COLUMN]), np.asarray(out[NOISE_COLUMN])
    labels, new_labels = np.asarray(digits_dataset["label"]), np.asarray(out["label"])
    assert poisoned.sum() == 8 and covers.sum() == 4 and not (poisoned & covers).any()
    assert (new_labels[poisoned] == 1).all() and (labels[poisoned] != 1).all()
    assert (new_labels[covers] == labels[covers]).all() and (new_labels[~poisoned] == labels[~poisoned]).all()
    for i in np.flatnonzero(poisoned):  # poisoned rows: the test-time trigger (the poison() contract)
        assert np.array_equal(
            np.asarray(out[int(i)]["image"]), np.asarray(attack.apply(digits_dataset[int(i)]["image"]))
        )
    for i in np.flatnonzero(covers):  # cover rows: the partial training-time trigger, seeded by the row index
        before = digits_dataset[int(i)]["image"]
        after = np.asarray(out[int(i)]["image"])
        assert np.array_equal(after, np.asarray(attack.apply_train(before, call_seed=int(i))))
        assert not np.array_equal(after, np.asarray(before))
    assert attack.noise_mode and attack.cross_ratio == 0.5
    plain = AdaptiveBlend(cover_rate=0.0, seed=2).poison(digits_dataset, rate=0.4, target=1)
    assert NOISE_COLUMN not in plain.column_names and plain[POISONED_COLUMN] == out[POISONED_COLUMN]


def test_adaptive_blend_round_trip_and_validation():
    attack = AdaptiveBlend(train_alpha=0.2, test_alpha=0.3, pieces=9, mask_rate=0.4, cover_rate=1, seed=4)
    assert attack.cover_rate == 1.0 and isinstance(attack.cover_rate, float)
    assert attack_from_dict(attack.to_dict()) == attack
    assert ATTACKS.get("adaptive_blend") is AdaptiveBlend
    assert ATTACKS.build("adaptive_blend") == AdaptiveBlend()
    assert AdaptiveBlend().seed_dependent and not AdaptiveBlend(test_alpha=0.0).seed_dependent
    with pytest.raises(ValueError, match=r"train_alpha must be a finite number in \[0.0, 1.0\], got 1.2"):
        AdaptiveBlend(train_alpha=1.2)
    with pytest.raises(ValueError, match=r"test_alpha must be a finite number in \[0.0, 1.0\], got -0.1"):
        AdaptiveBlend(test_alpha=-0.1)
    with pytest.raises(ValueError, match="pieces must be a perfect square"):
        AdaptiveBlend(pieces=8)
    with pytest.raises(ValueError, match="pieces must be >= 1"):
        AdaptiveBlend(pieces=0)
    with pytest.raises(ValueError, match="masks all 16 pieces"):
        AdaptiveBlend(mask_rate=1.0)
    with pytest.raises(ValueError, match="masks all 4 pieces"):
        AdaptiveBlend(pieces=4, mask_rate=0.9)
    with pytest.raises(ValueError, match=r"cover_rate must be a finite number in \[0.0, 10.0\]"):
        AdaptiveBlend(cover_rate=11.0)
    with pytest.raises(TypeError, match="pieces must be an int"):
        AdaptiveBlend(pieces=16.0)
    with pytest.raises(ValueError, match="unknown parameters"):
        attack_from_dict({**attack.to_dict(), "alpha": 0.2})
