"""The count-matched null of an accumulating calibration (``ScreenCalibration(null_counts="matched")``): a client
assessed on its k-th round is compared with statistics accumulated over k rows of one calibration client."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from metashield_hf.fl import ClientEvidence, EvidenceSettings, ScreenCalibration

SIGNAL = "trigger_drift"


def _evidence(values: np.ndarray) -> ClientEvidence:
    k = len(values)
    return ClientEvidence({SIGNAL: values}, {SIGNAL: values}, None, np.ones(k), np.zeros(k))


def _calibration(null_counts: str, **kwargs) -> ScreenCalibration:
    return ScreenCalibration(
        signals=(SIGNAL,), min_scale={}, accumulate=True, null_counts=null_counts,
        settings=EvidenceSettings(centre_by_round=False), **kwargs,
    )  # fmt: skip


def test_a_client_seen_k_times_is_compared_with_statistics_built_from_k_rows():
    rng = np.random.default_rng(0)
    cal = _calibration("matched")
    rounds = [["a", "b", "c"], ["a", "d", "e"], ["a", "b", "f"], ["g", "h", "i"]]  # a: 3 rows, b: 2, the rest 1
    for r, ids in enumerate(rounds):
        cal.update(_evidence(rng.normal(size=(3, 4))), round_id=r, client_ids=ids)
    z = cal.held_out_z()[SIGNAL]
    names = list(itertools.chain.from_iterable(rounds))
    rows = {c: [i for i, n in enumerate(names) if n == c] for c in dict.fromkeys(names)}
    for k in (1, 2, 3, 5):
        expected = []  # (statistic, weight): every min(k, n)-subset of a client's rows, the client weighing one
        for index in rows.values():
            m = min(k, len(index))
            subsets = list(itertools.combinations(index, m))
            expected += [(z[list(s)].sum(axis=0).max() / math.sqrt(m), 1 / len(subsets)) for s in subsets]
        stats, weights = cal.matched_null(k)
        got = np.array(sorted(zip(stats, weights, strict=True)))
        assert np.allclose(got, np.array(sorted(expected)))
        assert weights.sum() == pytest.approx(len(rows))  # nine clients
    stats, weights = cal.matched_null(2)
    assert len(stats) == 3 + 1 + 7  # a: C(3, 2) subsets; b: its pair; the seven others: their single row
    # the p-value of a client on its second round is taken against the count-2 null
    row = rng.normal(size=(1, 4))
    cal.assess(_evidence(row), client_ids=["new"])
    second = cal.assess(_evidence(row), client_ids=["new"])
    s = second.statistic[0]
    assert second.p_value[0] == pytest.approx((1 + weights[stats >= s].sum()) / (1 + weights.sum()))
    assert cal.threshold(2) < s or second.p_value[0] > cal.target_fpr  # threshold and p-value agree


def test_draws_cap_the_subsets_of_a_client_with_many_rows():
    rng = np.random.default_rng(1)
    cal = _calibration("matched", null_draws=5)
    for r in range(8):
        cal.update(_evidence(rng.normal(size=(2, 4))), round_id=r, client_ids=["a", f"o{r}"])
    stats, weights = cal.matched_null(4)  # a: C(8, 4) = 70 subsets, 5 drawn; each other client: one row
    assert len(stats) == 5 + 8 and weights.sum() == pytest.approx(9)
    assert np.array_equal(cal.matched_null(4)[0], _copy(cal).matched_null(4)[0])  # the draws are seeded


def _copy(cal: ScreenCalibration) -> ScreenCalibration:
    return ScreenCalibration.from_dict(cal.to_dict())


def test_a_label_skewed_client_in_many_rounds_is_flagged_by_the_short_running_null_not_by_the_matched_one():
    rng = np.random.default_rng(2)
    lean = np.zeros((20, 10))
    for j in range(6):  # six of the 20 benign clients lean towards one class of their own, every round
        lean[j, j] = 2.0
    history = []
    for _ in range(30):  # 30 benign rounds, 7 of 20 clients each: a client appears about 10 times
        ids = rng.choice(20, size=7, replace=False)
        history.append((rng.normal(size=(7, 10)) + lean[ids], ids.tolist()))
    old, new = _calibration("running"), _calibration("matched")
    for r, (values, ids) in enumerate(history[-5:]):  # the old default: the last 5 rounds, running null
        old.update(_evidence(values), round_id=r, client_ids=ids)
    for r, (values, ids) in enumerate(history):
        new.update(_evidence(values), round_id=r, client_ids=ids)
    assert sum(ids.count(0) for _, ids in history) >= 10  # the skewed client's history is as long as its screening
    for _ in range(10):  # 10 screened rounds, all benign; client 0 (leaning on class 0) in every one of them
        ids = [0, *rng.choice(np.arange(1, 20), size=6, replace=False).tolist()]
        values = rng.normal(size=(7, 10)) + lean[ids]
        got_old = old.assess(_evidence(values), client_ids=ids)
        got_new = new.assess(_evidence(values), client_ids=ids)
    assert old.memory["0"]["count"] == new.memory["0"]["count"] == 10
    assert got_old.flagged[0] and got_old.top_class[0] == 0  # its lean, accumulated over 10 rounds
    assert not got_new.flagged[0]


def test_the_matched_calibration_survives_json_and_an_old_file_loads_as_running(tmp_path):
    rng = np.random.default_rng(3)
    cal = _calibration("matched", null_draws=7)
    for r in range(6):
        cal.update(_evidence(rng.normal(size=(5, 6))), round_id=r, client_ids=rng.choice(8, 5, replace=False))
    row = rng.normal(size=(2, 6))
    cal.assess(_evidence(row), client_ids=["x", "y"])
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = ScreenCalibration.load(path)
    assert again.null_counts == "matched" and again.null_draws == 7 and again.memory["x"]["count"] == 1
    for k in (1, 2, 4):
        assert np.array_equal(again.matched_null(k)[0], cal.matched_null(k)[0])
        assert again.threshold(k) == cal.threshold(k)
    a, b = cal.assess(_evidence(row), client_ids=["x", "y"]), again.assess(_evidence(row), client_ids=["x", "y"])
    assert np.array_equal(a.p_value, b.p_value) and np.array_equal(a.flagged, b.flagged)
    saved = cal.to_dict()
    del saved["null_counts"], saved["null_draws"]  # a file saved before the matched null existed
    old = ScreenCalibration.from_dict(saved)
    assert old.null_counts == "running" and old.null_draws == 20
    assert np.array_equal(old.p_values(a.statistic), old.p_values(a.statistic, counts=[5, 5]))  # counts unused
    with pytest.raises(ValueError, match="null_counts"):
        _calibration("fixed")
