"""The dormant shortcut weights (a trigger-agnostic scan source) and the evidence union (a head part's alarms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metashield_hf.scan import (
    ALARM_PREFIX,
    DORMANT_SIGNALS,
    ScanHead,
    choose_part,
    dormant_mass,
    dormant_signals,
    fit_part,
    scan_model,
    set_alarms,
    split_candidate,
)
from metashield_hf.scan.head import part_cv_scores
from metashield_hf.targets import load_target

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dormant_mass_known_answer():
    # 3 classes, 4 features; features 0-2 are what clean inputs drive, feature 3 is quiet on them.
    h = torch.tensor([[1.0, 0.5, 0.8, 0.0], [0.9, 1.0, 0.7, 0.0], [0.6, 0.4, 1.0, 0.01]])
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    plain = dormant_mass(w, h)
    # every class reads one busy feature with the same weight: about equal masses
    assert plain.max() / plain.min() < 1.5
    shortcut = w.clone()
    shortcut[1, 3] = 1.0  # class 1 also reads the quiet feature: a shortcut
    mass = dormant_mass(shortcut, h)
    assert int(np.argmax(mass)) == 1 and mass[1] > 2 * mass[0]
    # the same weight on a busy feature is no shortcut
    busy = w.clone()
    busy[1, 0] = 1.0
    assert dormant_mass(busy, h)[1] < mass[1]
    # a feature every class reads alike is no class's shortcut (class-specific weights)
    shared = w.clone()
    shared[:, 3] = 1.0
    assert dormant_mass(shared, h) == pytest.approx(plain)
    signals = dormant_signals(mass)
    assert set(signals) == set(DORMANT_SIGNALS) and signals["dormant_log_z"] > 0
    with pytest.raises(ValueError, match="weight and"):
        dormant_mass(w, h[:, :3])
    with pytest.raises(ValueError, match="floor"):
        dormant_mass(w, h, floor=0.0)


@pytest.mark.slow
def test_scan_records_the_dormancy_of_one_clean_forward_pass(digits_models):
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    report = scan_model(backdoored.model, clean, seed=0, max_margin_steps=0)
    masses = [c.dormant_mass for c in report.per_class]
    assert set(DORMANT_SIGNALS) <= set(report.signals) and report.signals == {
        **report.signals,
        **dormant_signals(np.array(masses)),
    }
    # the scan's values are dormant_mass on the head and one clean forward pass (what record_dormancy.py adds to
    # records scanned before the source existed)
    adapter = load_target(backdoored.model)
    with torch.no_grad():
        out = adapter(list(clean))
    assert dormant_mass(adapter.head.weight, out.penultimate) == pytest.approx(masses, rel=1e-5)
    assert report.options["dormancy"] and "dormancy_s" in report.timings
    off = scan_model(backdoored.model, clean, seed=0, max_margin_steps=0, dormancy=False)
    assert not set(DORMANT_SIGNALS) & set(off.signals) and off.per_class[0].dormant_mass is None
    assert not off.options["dormancy"]


def _rows(rng: np.random.Generator, n_clean: int = 60, n_bd: int = 30) -> tuple[list[dict], np.ndarray]:
    """Synthetic signal dicts: ``anomaly_excess`` separates the backdoored rows, ``dormant_excess`` is noise on all."""
    rows = [
        {"anomaly_excess": float(a), "dormant_excess": float(d)}
        for a, d in zip(rng.normal(0, 1, n_clean + n_bd) + np.r_[np.zeros(n_clean), np.full(n_bd, 3.0)],
                        rng.normal(0, 1, n_clean + n_bd), strict=True)
    ]  # fmt: skip
    return rows, np.r_[np.zeros(n_clean, int), np.ones(n_bd, int)]


def test_alarm_crosses_the_threshold_with_its_signal():
    rows, y = _rows(np.random.default_rng(0))
    part = fit_part(rows, y, 1.0, ("anomaly_excess", ALARM_PREFIX + "dormant_excess"), fpr=0.1)
    t, scale = part.alarms["dormant_excess"]
    assert scale > 0 and set(part.alarms) == {"dormant_excess"}
    quiet = {"anomaly_excess": -5.0}
    # below t the logistic score decides (far below the threshold here); above t the alarm flags the model
    assert part.score(quiet | {"dormant_excess": t - 1e-3}) < part.threshold
    assert part.score(quiet | {"dormant_excess": t + 1e-3}) > part.threshold
    assert part.score(quiet | {"dormant_excess": t}) == pytest.approx(part.threshold)
    # each of the two flags about half of the target share of the clean rows (in sample here)
    clean = [r for r, label in zip(rows, y, strict=True) if not label]
    flagged = np.mean([part.score(r) > part.threshold for r in clean])
    assert 0.02 <= flagged <= 0.15
    # a scan without the alarm's signal is not scored by this part
    assert part.missing(quiet) == ["dormant_excess"]


def test_alarms_round_trip_and_fall_back(tmp_path):
    rows, y = _rows(np.random.default_rng(1))
    part = fit_part(rows, y, 1.0, ("anomaly_excess", ALARM_PREFIX + "dormant_excess"))
    head = ScanHead({"anomaly_excess": 1.0}, -2.0, 0.5, "test", {"image/blend": {"weights": {"anomaly_excess": 1.0},
                    "bias": -2.0}, "image/agnostic": part.__dict__ | {"by_modality": None}})  # fmt: skip
    head.save(tmp_path / "head.json")
    again = ScanHead.load(tmp_path / "head.json")
    agn = again.for_modality("image", {"anomaly_excess": 0.0, "dormant_excess": 9.0}, "agnostic")
    assert agn.alarms == part.alarms and agn.score({"anomaly_excess": 0.0, "dormant_excess": 9.0}) > agn.threshold
    # without the alarm's signal the scan falls back to the blend part
    assert again.part_key("image", {"anomaly_excess": 0.0}, "agnostic") == "image/blend"
    assert split_candidate(("a", ALARM_PREFIX + "b")) == (("a",), ("b",))
    assert set_alarms(ScanHead({"a": 1.0}, 0.0), [], [], 0.05).alarms is None
    with pytest.raises(ValueError, match="clean train models"):
        set_alarms(ScanHead({"a": 1.0}, 0.0), [], ["a"], 0.05)
    bad = ScanHead({"anomaly_excess": 1.0}, 0.0, alarms={"no_such_signal": [0.0, 1.0]})
    with pytest.raises(ValueError, match="unknown signals"):
        bad.score({"anomaly_excess": 0.0, "no_such_signal": 1.0})
    assert math.isfinite(agn.score({"anomaly_excess": -1e4, "dormant_excess": -1e4}))


def test_choose_part_sets_the_union_threshold_from_out_of_fold_scores():
    rows_signals, y = _rows(np.random.default_rng(2))
    attacks = ["a", "b", "c"]
    rows = [
        {"metashield": {"signals": sig}, "is_backdoored": bool(label), "dataset": "d",
         "attack": attacks[i % 3] if label else "none"}
        for i, (sig, label) in enumerate(zip(rows_signals, y, strict=True))
    ]  # fmt: skip
    alarm = ("anomaly_excess", ALARM_PREFIX + "dormant_excess")
    choice = choose_part(rows, [("anomaly_excess",), alarm], (1.0,), target_fpr=0.1, name="test")
    # the signals carry no alarm-worthy evidence, so the logistic part alone wins
    assert choice.signals == ("anomaly_excess",) and choice.part.alarms is None
    forced = choose_part(rows, [alarm], (1.0,), target_fpr=0.1, name="test")
    part = forced.part
    assert set(part.alarms) == {"dormant_excess"}
    # the logistic threshold flags half of the target share of the clean rows by the out-of-fold scores
    oof = np.concatenate([s[y == 0] for s in part_cv_scores(rows, ("anomaly_excess",), 1.0)])
    assert part.threshold == pytest.approx(float(np.quantile(oof, 1.0 - 0.05)))
    clean = [r["metashield"]["signals"] for r in rows if not r["is_backdoored"]]
    assert part.alarms["dormant_excess"][0] == pytest.approx(
        float(np.quantile([s["dormant_excess"] for s in clean], 0.95))
    )
