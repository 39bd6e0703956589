"""The calibrated screen's evidence for small colluding updates: the margin gain at the global model's own
maximum-margin inputs (``point_margin_gain``) and evidence accumulated per client over rounds (``accumulate``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fl_helpers import screened_round

from metashield_hf.fl import ClientEvidence, EvidenceSettings, ScreenCalibration, client_evidence, score_client_updates
from metashield_hf.fl.calibration import point_margins

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = EvidenceSettings(margin_steps=10, synthesis_steps=10, n=10, seed=0)


def _evidence(values: np.ndarray, signal: str = "trigger_drift") -> ClientEvidence:
    k = len(values)
    return ClientEvidence({signal: values}, {signal: values}, None, np.ones(k), np.zeros(k))


def test_point_margins_at_a_models_own_maximising_inputs_are_its_maximum_margins():
    from metashield_hf.scan.max_margin import max_margins
    from metashield_hf.scan.scanner import prepare_clean_items
    from metashield_hf.targets import load_target

    model, _, _, clean, _ = screened_round()
    adapter = load_target(model.eval())
    items = prepare_clean_items(adapter, clean[:10], 10, 0)
    with torch.no_grad():
        adapter(items)  # shows the adapter its head
    result = max_margins(adapter, items, 10, steps=10, starts=4, seed=0, progress=False)
    assert np.allclose(point_margins(adapter, items, result.inputs), result.margins, atol=1e-4)


def test_point_margin_gain_is_what_the_update_adds_at_the_global_models_maximising_inputs():
    model, _, _, clean, _ = screened_round()
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    bias = {"classifier.bias": torch.zeros(10)}
    bias["classifier.bias"][7] = 2.0  # raises class 7's logit by 2 on every input, nothing else
    got = client_evidence(model, [zero, bias], clean[:10], signals=("point_margin_gain",), settings=FAST)
    raw = got.raw["point_margin_gain"]
    assert np.allclose(raw[0], 0.0, atol=1e-5)  # no update, no gain
    assert raw[1, 7] == pytest.approx(2.0, abs=1e-4)  # class 7 gains exactly its bias
    assert (np.delete(raw[1], 7) <= 1e-5).all()  # the others can only lose (class 7 may be their runner-up)
    # centred on the candidate only, whatever the settings say: two clients are no round to centre on anyway, and
    # the round's median is what colluders would pull
    assert got.centred["point_margin_gain"][1].argmax() == 7


def _calibrated(accumulate: bool, rng: np.random.Generator) -> ScreenCalibration:
    cal = ScreenCalibration(
        signals=("trigger_drift",), min_scale={}, accumulate=accumulate,
        settings=EvidenceSettings(centre_by_round=False),
    )  # fmt: skip
    for r in range(20):  # 20 benign rounds, 8 of 20 persistent clients each
        ids = rng.choice(20, size=8, replace=False).tolist()
        cal.update(_evidence(rng.normal(size=(8, 10))), round_id=r, client_ids=ids)
    return cal


def test_accumulated_evidence_flags_a_client_whose_every_update_pushes_one_class_a_little():
    rng = np.random.default_rng(0)
    for accumulate in (False, True):
        cal = _calibrated(accumulate, rng)
        flagged_bad, flagged_benign = [], []
        for _ in range(12):  # 12 screened rounds: the attacker (id 99) in each, 7 benign clients drawn from the 20
            values = rng.normal(size=(8, 10))
            values[0] = 0.0
            values[0, 7] = 1.5  # 1.5 benign spreads on class 7, below one round's max over 10 classes
            ids = [99, *rng.choice(20, size=7, replace=False).tolist()]
            got = cal.assess(_evidence(values), client_ids=ids)
            flagged_bad.append(bool(got.flagged[0]))
            flagged_benign.extend(got.flagged[1:].tolist())
        if accumulate:
            assert not flagged_bad[0] and all(flagged_bad[4:]), flagged_bad  # 1.5 * sqrt(m) passes the null
            assert cal.memory["99"]["count"] == 12
            assert cal.memory["99"]["trigger_drift"].argmax() == 7
        else:
            assert not any(flagged_bad)
        assert np.mean(flagged_benign) <= 0.2, (accumulate, np.mean(flagged_benign))


def test_accumulation_is_stouffers_sum_and_survives_json(tmp_path):
    rng = np.random.default_rng(1)
    cal = _calibrated(True, rng)
    row = rng.normal(size=(1, 10))
    first = cal.assess(_evidence(row), client_ids=["a"])
    second = cal.assess(_evidence(row), client_ids=["a"])  # the same evidence again: sum 2z over sqrt(2) rounds
    assert np.allclose(second.z["trigger_drift"], first.z["trigger_drift"] * math.sqrt(2))
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = ScreenCalibration.load(path)
    assert again.accumulate and again.memory["a"]["count"] == 2 and again.row_clients == cal.row_clients
    assert np.array_equal(again.null_statistics(), cal.null_statistics())
    saved = cal.to_dict()
    del saved["accumulate"], saved["memory"], saved["row_clients"]  # a file saved before accumulation existed
    assert not ScreenCalibration.from_dict(saved).accumulate
    third, fourth = cal.assess(_evidence(row), client_ids=["a"]), again.assess(_evidence(row), client_ids=["a"])
    assert np.allclose(third.z["trigger_drift"], fourth.z["trigger_drift"])


def test_accumulating_calibration_refusals():
    rng = np.random.default_rng(2)
    cal = _calibrated(True, rng)
    alone = cal.assess(_evidence(rng.normal(size=(3, 10))))  # no ids: the round alone, nothing remembered
    assert len(alone.flagged) == 3 and not cal.memory
    with pytest.raises(ValueError, match="client_ids for 3 clients"):
        cal.assess(_evidence(rng.normal(size=(3, 10))), client_ids=[1, 2])
    model, deltas, _, clean, _ = screened_round()
    with pytest.raises(ValueError, match="pass client_ids"):
        score_client_updates(model, deltas, clean[:10], calibration=cal)
