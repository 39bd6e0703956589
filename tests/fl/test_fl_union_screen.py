"""The union of the single-round and the capped accumulated screen (``ScreenCalibration(single_round_union=True)``):
each half at half the target FPR; a huge first-round update is flagged at once, an honest single spike only in its own
round, a steady push from its second round on."""

from __future__ import annotations

import math

import pytest
from fl_helpers import class_row, planted_evidence

from metashield_hf.fl import EvidenceSettings, ScreenCalibration
from metashield_hf.fl.calibration import DEFAULT_SINGLE_ROUND_UNION
from metashield_hf.fl.screen import MAD_CONSISTENCY

SIGNAL = "trigger_drift"
U = 1.0 / MAD_CONSISTENCY  # class values in {-U, 0, U} (and two spikes): median 0, MAD U, so a class's scale is 1
ROUNDS = 7  # 7 rounds x 3 clients = 21 rows: 1 / 22 <= 0.05, enough for each half of the union at target 0.10


def _calibration(round_cap: float | None = None, union: bool = False, rounds: int = ROUNDS) -> ScreenCalibration:
    """Benign rounds of three clients (a new id each round: the running null is the rows themselves); in rounds 1
    and 4 one client has a single-round spike of z = 5, so the single-round null's largest rows are 5 and the capped
    null's (cap 3) are at the cap."""
    cal = ScreenCalibration(
        signals=(SIGNAL,), min_scale={}, accumulate=True, round_cap=round_cap, single_round_union=union,
        settings=EvidenceSettings(centre_by_round=False),
    )  # fmt: skip
    for r in range(rounds):
        rows = [class_row(-U), class_row(0.0), class_row(5.0 if r in (1, 4) else U)]
        cal.update(planted_evidence(rows), round_id=r, client_ids=[f"{r}:{k}" for k in range(3)])
    return cal


def _screen(cal: ScreenCalibration, z_by_round: dict[str, list[float]]) -> list[dict[str, bool]]:
    """Each client's flag per screened round; ``z_by_round``: client -> its class-0 z in each round."""
    names = list(z_by_round)
    out = []
    for r in range(len(next(iter(z_by_round.values())))):
        verdict = cal.assess(planted_evidence([class_row(z_by_round[n][r]) for n in names]), client_ids=names)
        out.append(dict(zip(names, verdict.flagged.tolist(), strict=True)))
    return out


def test_the_halves_thresholds_and_nulls():
    union = _calibration(3.0, union=True)
    assert union.level == pytest.approx(0.05) and union.ready
    assert union.single_round_null().max() == pytest.approx(5.0)  # unclipped, not accumulated
    assert union.null_statistics().max() == pytest.approx(3.0)  # clipped to the cap
    assert union.threshold(single_round=True) == pytest.approx(5.0)  # 0.05 of 21 rows: above the largest
    assert union.threshold() == pytest.approx(3.0)


def test_a_huge_first_round_update_is_flagged_by_the_union_not_by_the_capped_screen():
    trajectory = {"attacker": [20.0, 20.0, 20.0], "quiet": [0.0, 0.0, 0.0]}
    union = _screen(_calibration(3.0, union=True), trajectory)
    capped = _screen(_calibration(3.0), trajectory)
    assert union[0] == {"attacker": True, "quiet": False}  # single-round half: 20 > 5
    assert capped[0] == {"attacker": False, "quiet": False}  # 3 at the cap ties with 2 null rows: p = 3/22 > 0.10
    assert capped[1]["attacker"]  # 3·√2 from its second round


def test_an_honest_spike_is_flagged_in_its_own_round_only():
    trajectory = {"honest": [0.0, 12.0, 0.0, 0.0]}
    union = [r["honest"] for r in _screen(_calibration(3.0, union=True), trajectory)]
    uncapped = [r["honest"] for r in _screen(_calibration(None), trajectory)]
    assert union == [False, True, False, False]
    assert uncapped == [False, True, True, True]  # 12/√3 = 6.9, 12/√4 = 6 > 5: the Stouffer sum carries the spike


def test_a_steady_push_is_flagged_from_its_second_round_by_the_accumulated_half():
    cal = _calibration(3.0, union=True)
    flags, single_p, acc_p, p = [], [], [], []
    for _ in range(3):
        verdict = cal.assess(planted_evidence([class_row(2.5)]), client_ids=["push"])
        flags.append(bool(verdict.flagged[0]))
        single_p.append(float(verdict.single_round_p_value[0]))
        acc_p.append(float(verdict.accumulated_p_value[0]))
        p.append(float(verdict.p_value[0]))
        assert verdict.single_round_statistic[0] == pytest.approx(2.5)
    assert flags == [False, True, True]  # 2.5, then 5/√2 = 3.5 > 3
    assert all(s > 0.05 for s in single_p)  # the single-round half never flags it
    assert acc_p[1] == pytest.approx(1 / 22)
    assert p == pytest.approx([min(1.0, 2 * min(a, b)) for a, b in zip(single_p, acc_p, strict=True)])


def test_default_validation_readiness_and_round_trip(tmp_path):
    assert DEFAULT_SINGLE_ROUND_UNION is False and ScreenCalibration().single_round_union is False
    with pytest.raises(ValueError, match="accumulate"):
        ScreenCalibration(accumulate=False, single_round_union=True)
    five = _calibration(3.0, union=False, rounds=5)  # 15 rows: 1/16 <= 0.10 but > 0.05
    assert five.ready and not _calibration(3.0, union=True, rounds=5).ready
    cal = _calibration(3.0, union=True)
    cal.save(tmp_path / "cal.json")
    loaded = ScreenCalibration.load(tmp_path / "cal.json")
    assert loaded.single_round_union and loaded.round_cap == 3.0
    assert math.isclose(loaded.threshold(single_round=True), cal.threshold(single_round=True))
