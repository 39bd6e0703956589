"""The calibrated client screen: per-class standardisation against benign rounds, a p-value with a known null, and
the screen on real digits rounds (one BadNets-poisoned client) and through MetaShieldStrategy."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from fl_helpers import MALICIOUS, screened_round

from metashield_hf.fl import ClientEvidence, EvidenceSettings, ScreenCalibration, score_client_updates
from metashield_hf.fl.calibration import centre_evidence
from metashield_hf.fl.federation import local_train
from metashield_hf.fl.simulate import SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

# small budgets: the known answers below hold at them, and a round of 5 candidates is measured in seconds
FAST = EvidenceSettings(margin_steps=10, synthesis_steps=20, n=10, seed=0)


def _evidence(values: np.ndarray, signal: str = "trigger_drift") -> ClientEvidence:
    k = len(values)
    return ClientEvidence({signal: values}, {signal: values}, None, np.ones(k), np.zeros(k))


def _skewed_rows(rng: np.random.Generator, rows: int, classes: int = 10) -> np.ndarray:
    """Benign per-class evidence where class 3 moves 8x as much as the others (the clients that hold most of it)."""
    scale = np.ones(classes)
    scale[3] = 8.0
    return rng.normal(size=(rows, classes)) * scale


def test_calibrated_false_alarm_rate_is_near_the_target_and_label_skew_is_not_a_trigger():
    rng = np.random.default_rng(0)
    for null in ("empirical", "sidak"):
        cal = ScreenCalibration(signals=("trigger_drift",), target_fpr=0.10, null=null, min_scale={})
        for r in range(20):  # 20 benign rounds of 10 clients
            cal.update(_evidence(_skewed_rows(rng, 10)), round_id=r)
        assert cal.ready and cal.num_rows == 200 and cal.num_classes == 10
        # 400 fresh benign rounds of 10 clients, each assessed as the server would
        fresh = [cal.assess(_evidence(_skewed_rows(rng, 10))) for _ in range(400)]
        flagged = np.concatenate([f.flagged for f in fresh])
        statistic = np.concatenate([f.statistic for f in fresh])
        # the empirical null holds the target; Šidák's normal model is an approximation (see the module)
        low, high = (0.06, 0.14) if null == "empirical" else (0.06, 0.20)
        assert low <= flagged.mean() <= high, (null, flagged.mean())
        # flagged exactly when the statistic reaches the threshold
        thr = cal.threshold()
        assert np.array_equal(flagged, statistic >= thr - 1e-12), null
        # a planted class (+6 benign spreads on class 7) is flagged and named; the same push on the skewed class 3
        # is within its benign spread and is not
        planted, skewed = np.zeros((1, 10)), np.zeros((1, 10))
        planted[0, 7], skewed[0, 3] = 6.0, 6.0
        got = cal.assess(_evidence(np.vstack([planted, skewed])))
        assert got.flagged.tolist() == [True, False], null
        assert got.top_class[0] == 7 and got.p_value[0] < got.p_value[1]
    # one pooled scale for every class (what a calibration without per-class standardisation does) reads the skewed
    # class as a trigger: the per-class normalisation is what keeps the false alarms at the target
    pooled = _skewed_rows(rng, 4000)
    pooled_z = pooled / (1.4826 * np.median(np.abs(_skewed_rows(rng, 200))))
    assert (pooled_z.max(axis=1) > cal.threshold()).mean() > 0.4


def test_calibration_json_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(1)
    cal = ScreenCalibration(signals=("trigger_drift",), target_fpr=0.10)
    with pytest.raises(ValueError, match="not enough"):
        cal.assess(_evidence(rng.normal(size=(3, 4))))
    for r in range(4):
        cal.update(_evidence(rng.normal(size=(5, 4))), round_id=r)
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = ScreenCalibration.load(path)
    probe = _evidence(rng.normal(size=(6, 4)) * 3)
    assert np.array_equal(cal.assess(probe).p_value, again.assess(probe).p_value)
    assert again.settings == cal.settings and again.signals == ("trigger_drift",)
    with pytest.raises(ValueError, match="classes"):
        cal.assess(_evidence(rng.normal(size=(2, 5))))
    with pytest.raises(ValueError, match="unknown calibrated signals"):
        ScreenCalibration(signals=("mask_size",))
    with pytest.raises(ValueError, match="lacks signals"):
        ScreenCalibration(signals=("margin_gain",)).update(_evidence(rng.normal(size=(3, 4))))


@functools.lru_cache(maxsize=1)
def _benign_rounds(rounds: int = 3):
    """Benign rounds from the digits round's global model: every client trains 1 epoch on its own (Dirichlet-skewed)
    data with a per-round seed. Returns ``(global_model, [deltas per round], clean, poisoned deltas)``."""
    from fl_helpers import digits_federation

    model, poisoned, _, clean, _ = screened_round()
    clients, _ = digits_federation(num_clients=5, seed=0)
    g = {k: v.clone() for k, v in model.state_dict().items()}
    work = SmallCNN()
    out = []
    for r in range(rounds):
        out.append(
            [
                local_train(
                    work,
                    g,
                    c.x,
                    c.y,
                    lr=0.1,
                    epochs=2,
                    batch_size=16,
                    generator=torch.Generator().manual_seed(1000 + 10 * r + i),
                )  # fmt: skip
                for i, c in enumerate(clients)
            ]
        )
    return model, out, clean, poisoned


def test_calibrated_screen_flags_the_poisoned_client_and_not_the_benign_ones():
    model, rounds, clean, poisoned = _benign_rounds()
    cal = ScreenCalibration(target_fpr=0.10, settings=FAST)
    for r, deltas in enumerate(rounds):
        cal.calibrate(model, deltas, clean[:10], round_id=r)
    assert cal.ready and cal.num_rows == 15
    scores = score_client_updates(model, poisoned, clean[:10], client_ids=[10, 11, 12, 13, 14], calibration=cal)
    bad = scores[MALICIOUS]
    assert [s.client for s in scores] == [10, 11, 12, 13, 14]
    assert bad.flagged and bad.score == max(s.score for s in scores)
    assert bad.evidence["suspected_target"] == 0 and bad.evidence["p_value"] <= 0.10
    assert not any(s.flagged for i, s in enumerate(scores) if i != MALICIOUS)
    assert all(s.evidence["calibrated"] and len(s.evidence["z"]["margin_gain"]) == 10 for s in scores)


def test_metashield_strategy_calibrates_on_trusted_rounds_then_drops_the_poisoned_reply():
    pytest.importorskip("flwr", reason="Flower is the optional 'fl' extra: pip install -e '.[fl]'")
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from metashield_hf.fl import MetaShieldStrategy
    from metashield_hf.fl.flower import build_replies
    from metashield_hf.fl.screen import candidate_state

    model, rounds, clean, poisoned = _benign_rounds()
    nodes = [101, 102, 103, 104, 105]
    g = model.state_dict()
    cal = ScreenCalibration(signals=("trigger_drift",), target_fpr=0.10, settings=FAST)
    strategy = MetaShieldStrategy(FedAvg(), clean[:10], SmallCNN, calibration=cal, calibration_rounds=3)
    strategy.set_global_arrays(ArrayRecord(g))
    for r, deltas in enumerate(rounds, start=1):  # trusted: every reply is aggregated, the history grows
        replies = build_replies([candidate_state(g, d) for d in deltas], [100] * 5, nodes, server_round=r)
        _, metrics = strategy.aggregate_train(r, replies)
        assert metrics["metashield-calibrating"] == 1 and r not in strategy.history
    assert cal.num_rows == 15 and cal.ready
    replies = build_replies([candidate_state(g, d) for d in poisoned], [100] * 5, nodes, server_round=4)
    _, metrics = strategy.aggregate_train(4, replies)
    assert metrics[f"metashield-flagged-{nodes[MALICIOUS]}"] == 1 and metrics["metashield-num-flagged"] == 1
    assert strategy.history[4][MALICIOUS].evidence["top_signal"] == "trigger_drift"
    with pytest.raises(ValueError, match="needs a calibration"):
        MetaShieldStrategy(FedAvg(), clean[:10], SmallCNN, calibration_rounds=2)


def test_evidence_from_saved_raw_values_rescores_as_the_original():
    rng = np.random.default_rng(0)
    raw = {"margin_gain": rng.normal(size=(6, 10)), "point_margin_gain": rng.normal(size=(6, 10))}
    saved = {s: v.tolist() for s, v in raw.items()}  # as a --save_evidence file holds them
    rebuilt = ClientEvidence.from_raw(saved)
    assert rebuilt.num_clients == 6 and rebuilt.update_norms.tolist() == [1.0] * 6
    # the centring is derived on use, each signal as the live screen centres it (margin gain on the round too)
    assert np.allclose(rebuilt.centred_for("margin_gain", True), centre_evidence(raw["margin_gain"], by_round=True))
    assert np.allclose(
        rebuilt.centred_for("point_margin_gain", True), centre_evidence(raw["point_margin_gain"], by_round=False)
    )
    with pytest.raises(ValueError, match="same number of clients"):
        ClientEvidence.from_raw({"margin_gain": raw["margin_gain"], "point_margin_gain": raw["point_margin_gain"][:5]})
