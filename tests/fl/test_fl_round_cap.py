"""Each round's standardised evidence clipped before it accumulates (``ScreenCalibration(round_cap=c)``): a single
spike adds at most ``c``, a steady push still adds up, and the null's rows are clipped alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fl_helpers import class_row, planted_evidence

from metashield_hf.fl import EvidenceSettings, ScreenCalibration
from metashield_hf.fl.calibration import DEFAULT_ROUND_CAP
from metashield_hf.fl.screen import MAD_CONSISTENCY

SIGNAL = "trigger_drift"
U = 1.0 / MAD_CONSISTENCY  # class values in {-U, 0, U}: median 0, MAD U, so a class's scale is exactly 1


def _calibration(round_cap: float | None, spike: float | None = None) -> ScreenCalibration:
    """Four benign rounds of three clients; class 0 and 2 standardise to z = value (location 0, scale 1)."""
    cal = ScreenCalibration(
        signals=(SIGNAL,), min_scale={}, accumulate=True, round_cap=round_cap,
        settings=EvidenceSettings(centre_by_round=False),
    )  # fmt: skip
    for r in range(4):
        rows = [class_row(-U), class_row(0.0), class_row(U)]
        if spike is not None and r == 1:
            rows[2] = class_row(spike)  # one benign client's single-round spike
        cal.update(planted_evidence(rows), round_id=r, client_ids=[f"c{r}", "steady", "spiky"])
    return cal


def _screen(cal: ScreenCalibration) -> dict[str, float]:
    """Four screened rounds: "spike" has z 20 in its first round and 0 after; "push" has z 2.5 every round."""
    for r in range(4):
        out = cal.assess(
            planted_evidence([class_row(20.0 if r == 0 else 0.0), class_row(2.5)]), client_ids=["spike", "push"]
        )
    return dict(zip(["spike", "push"], out.statistic.tolist(), strict=True))


def test_capped_the_steady_push_ranks_above_the_single_spike():
    uncapped = _screen(_calibration(None))
    assert uncapped["spike"] == pytest.approx(20.0 / math.sqrt(4))  # 10: the spike carried by the Stouffer sum
    assert uncapped["push"] == pytest.approx(2.5 * 4 / math.sqrt(4))  # 5
    assert uncapped["spike"] > uncapped["push"]
    capped = _screen(_calibration(3.0))
    assert capped["spike"] == pytest.approx(3.0 / math.sqrt(4))  # 1.5: the spike adds at most the cap
    assert capped["push"] == pytest.approx(5.0)  # below the cap: unchanged
    assert capped["push"] > capped["spike"]


def test_the_null_rows_are_clipped_alike():
    spike = 50.0 * U
    free, capped = _calibration(None, spike=spike), _calibration(2.0, spike=spike)
    z_free, z_capped = free.held_out_z()[SIGNAL], capped.held_out_z()[SIGNAL]
    assert z_free.max() > 2.0
    assert np.allclose(z_capped, np.clip(z_free, -2.0, 2.0))
    # the running null accumulates the clipped rows: "spiky" (rounds 0-3) holds U, 50U, U, U in class 0
    rows = np.asarray(capped.row_clients) == "spiky"
    z_spiky = np.clip(z_free[rows, 0], -2.0, 2.0)
    expected = np.cumsum(z_spiky) / np.sqrt(np.arange(1, 5))
    assert np.allclose(capped.null_statistics()[rows], expected)
    assert capped.null_statistics().max() <= 2.0 * math.sqrt(4) + 1e-9


def test_default_is_no_cap_and_the_setting_round_trips(tmp_path):
    assert DEFAULT_ROUND_CAP is None and ScreenCalibration().round_cap is None
    cal = _calibration(3.0)
    cal.save(tmp_path / "cal.json")
    assert ScreenCalibration.load(tmp_path / "cal.json").round_cap == 3.0
    old = cal.to_dict()
    del old["round_cap"]  # saved before the cap existed
    assert ScreenCalibration.from_dict(old).round_cap is None


@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_a_cap_that_is_not_positive_is_refused(cap):
    with pytest.raises(ValueError, match="round_cap must be a positive number or None"):
        ScreenCalibration(round_cap=cap)
