"""The target chooser: the suspected target from every source's per-class evidence, its fit and choice, and the scan
and the head that carry it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metashield_hf.scan import (
    CLASS_FEATURES,
    ScanHead,
    choose_target,
    choose_target_chooser,
    class_features,
    fit_target_chooser,
    leave_attack_out_target_accuracy,
    record_target,
    scan_model,
    scan_record,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _per_class(rng: np.random.Generator, target: int, k: int = 10, signal: str = "dormant_mass") -> dict:
    """Per-class arrays of one model: noise everywhere, and the target's ``signal`` raised (if ``signal``)."""
    pc = {
        "anomaly_index": rng.normal(0, 1, k),
        "blend_size": np.exp(rng.normal(-1.5, 0.3, k)),
        "detector_score": rng.uniform(0.1, 0.4, k),
        "dormant_mass": np.exp(rng.normal(1.0, 0.1, k)),
        "max_margin": np.exp(rng.normal(3.0, 0.3, k)),
    }
    if signal == "dormant_mass":
        pc["dormant_mass"][target] *= 2.0
    elif signal == "anomaly_index":
        pc["anomaly_index"][target] += 6.0
    return pc


def test_class_features_known_answer():
    pc = {
        "anomaly_index": [0.0, 3.0, -1.0],
        "blend_size": [0.1, 0.2, 0.4],
        "detector_score": [0.2, 0.9, 0.3],
        "dormant_mass": [1.0, np.e, np.e**2],
        "max_margin": [-5.0, 1.0, np.e],
    }
    x = class_features(pc, list(CLASS_FEATURES))
    assert x.shape == (3, len(CLASS_FEATURES))
    col = dict(zip(CLASS_FEATURES, x.T, strict=True))
    assert col["anomaly_index"] == pytest.approx([0.0, 3.0, -1.0])
    assert col["detector_excess"] == pytest.approx([-0.1, 0.6, 0.0])
    assert col["dormant_log_ratio"] == pytest.approx([-1.0, 0.0, 1.0])
    # a negative margin is floored before the log; the median of (log 0.01, 0, 1) is 0
    assert col["max_margin_log_ratio"] == pytest.approx([np.log(0.01), 0.0, 1.0])
    # blend: the smallest blend (class 0) is the most target-like; robust z of -log size, median class 1
    z = -np.log([0.1, 0.2, 0.4]) + np.log(0.2)
    assert col["blend_z"] == pytest.approx(z / (1.4826 * np.log(2)))
    # each feature is relative to the model's classes: a common scale does not move it
    scaled = {**pc, "dormant_mass": 7.0 * np.asarray(pc["dormant_mass"])}
    assert class_features(scaled, ["dormant_log_ratio"]) == pytest.approx(class_features(pc, ["dormant_log_ratio"]))
    with pytest.raises(ValueError, match="unknown class features"):
        class_features(pc, ["nope"])
    with pytest.raises(ValueError, match="no 'blend_size'"):
        class_features({**pc, "blend_size": None}, ["blend_z"])
    assert choose_target({"dormant_log_ratio": 1.0}, pc) == 2
    assert choose_target({"anomaly_index": 1.0}, pc) == 1


def test_fit_weighs_the_feature_that_marks_the_target_and_carries_over_to_another_attack():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 10, 60)
    per_class = [_per_class(rng, int(t)) for t in targets]
    names = ["anomaly_index", "dormant_log_ratio"]
    weights = fit_target_chooser(per_class, targets, names, c=1.0)
    assert weights["dormant_log_ratio"] > 0 and abs(weights["dormant_log_ratio"]) > 5 * abs(weights["anomaly_index"])
    assert np.mean([choose_target(weights, pc) == t for pc, t in zip(per_class, targets, strict=True)]) > 0.95
    # two attacks that both raise the dormant mass: a chooser fit on one names the other's targets
    attacks = ["a"] * 30 + ["b"] * 30
    acc = leave_attack_out_target_accuracy(per_class, targets, attacks, names, c=1.0)
    assert set(acc) == {"a", "b"} and min(acc.values()) > 0.9
    # the anomaly index alone points nowhere here (about chance over 10 classes)
    acc = leave_attack_out_target_accuracy(per_class, targets, attacks, ["anomaly_index"])
    assert max(acc.values()) < 0.4
    with pytest.raises(ValueError, match="outside"):
        fit_target_chooser(per_class[:2], [0, 10], names)


def test_the_choice_ships_a_chooser_only_when_it_gains_over_the_anomaly_index():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 10, 40)
    attacks = ["a", "b"] * 20
    dormant = [_per_class(rng, int(t)) for t in targets]
    choice = choose_target_chooser(dormant, targets, attacks, [["anomaly_index", "dormant_log_ratio"]], cs=[1.0])
    assert choice.names == ("anomaly_index", "dormant_log_ratio") and choice.weights is not None
    assert choice.baseline < 0.4 < 0.9 < choice.scores[(choice.names, 1.0)]
    # where the anomaly index already names every target, no candidate gains min_gain: no chooser
    patch = [_per_class(rng, int(t), signal="anomaly_index") for t in targets]
    choice = choose_target_chooser(
        patch, targets, attacks, [["anomaly_index", "dormant_log_ratio"]], cs=[1.0], min_gain=0.05
    )
    assert choice.baseline == 1.0 and choice.weights is None


def test_a_head_part_with_a_chooser_round_trips_and_names_the_records_target(tmp_path):
    head = ScanHead({"anomaly_excess": 1.0}, 0.0, 0.5, "test")
    head.save(tmp_path / "plain.json")
    assert "target" not in json.loads((tmp_path / "plain.json").read_text())  # as saved before the chooser existed
    head.target = {"dormant_log_ratio": 1.0}
    head.save(tmp_path / "chooser.json")
    assert ScanHead.load(tmp_path / "chooser.json").target == {"dormant_log_ratio": 1.0}
    rec = {
        "modality": "image",
        "domain": "cv",
        "metashield": {
            "signals": {"anomaly_excess": 0.0},
            "suspected_target": 0,
            "per_class": {"dormant_mass": [1.0, 3.0, 1.0]},
        },
    }
    assert record_target(head, rec) == 1
    head.target = None  # no chooser: the record's own target (a token search's)...
    assert record_target(head, rec) == 0
    rec["metashield"]["per_class"]["anomaly_index"] = [0.1, -2.0, 3.0]  # ...or the mask synthesis' pointer
    assert record_target(head, rec) == 2


@pytest.mark.slow
def test_a_default_scan_names_the_chooser_s_target(digits_models):
    """A default scan (dormancy and max-margin on) is scored by the shipped agnostic part, whose chooser names the
    target from the report's own per-class evidence; the planted BadNets target (0) is found."""
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    report = scan_model(backdoored.model, clean, seed=0)
    part = ScanHead.load().by_modality["image/agnostic"]
    assert part["target"], "the shipped agnostic part has a target chooser"
    per_class = {
        name: [getattr(ev, name) for ev in report.per_class]
        for name in ("anomaly_index", "blend_size", "detector_score", "dormant_mass", "max_margin")
    }
    assert report.suspected_target == choose_target(part["target"], per_class) == 0
    rec = scan_record(report, model_id="digits", domain="cv", dataset="digits", is_backdoored=True, target_label=0)
    assert record_target(ScanHead.load(), rec) == report.suspected_target
