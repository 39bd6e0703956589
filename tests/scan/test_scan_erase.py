"""The erase check (issue [3/5]): blanking out the synthesized trigger's region on the bundled BadNets digits model
takes the trigger away from triggered inputs and leaves clean ones alone; the shield switches it on only when its
clean samples do not move, and calibrates its threshold on the combined scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metashield_hf import load_detector
from metashield_hf.evaluation.metrics import rates
from metashield_hf.scan.erase import ERASE_FLIP_DROP, EraseCheck
from metashield_hf.scan.positives import SynthesizedPositives
from metashield_hf.shield import adapt, use_erase
from metashield_hf.targets import load_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_erase_check_catches_the_patch_and_keeps_the_threshold(digits_models, detector):
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    off = adapt(detector, backdoored.model, clean, seed=0, erase="off")
    on = adapt(detector, backdoored.model, clean, seed=0)
    assert off.erase is None and off.erase_note == "off by request"
    assert on.erase is not None and on.erase.target_class == backdoored.target_label and on.erase_note == ""
    # the synthesized mask is small (a 2x2 patch on 8x8 digits is 1/16 of the input)
    assert float(on.erase.mask.mean()) < 0.15
    items_t = on.target.prepare_items(backdoored.test_triggered)
    items_c = on.target.prepare_items(backdoored.test_clean)
    drops_t, drops_c = on.erase.drops(on.target, items_t), on.erase.drops(on.target, items_c)
    assert np.median(drops_t) > 0.9 and np.quantile(drops_c, 0.95) < 0.1
    # given logits give the same drops as the pass the check runs itself
    logits = on.target(items_t[:30]).logits
    np.testing.assert_allclose(on.erase.drops(on.target, items_t[:30], logits), drops_t[:30], atol=1e-5)
    # scores: the larger of the detector's and the drop; the threshold is recalibrated on the support's combined
    # scores, so the clean FPR stays near the asked rate while the TPR rises
    s_c, s_t = on.score(backdoored.test_clean), on.score(backdoored.test_triggered)
    np.testing.assert_allclose(s_t, np.maximum(off.score(backdoored.test_triggered), drops_t), atol=1e-5)
    y = np.r_[np.zeros(len(s_c)), np.ones(len(s_t))]
    with_check = rates(np.r_[s_c, s_t], y, on.threshold)
    without = rates(np.r_[off.score(backdoored.test_clean), off.score(backdoored.test_triggered)], y, off.threshold)
    assert with_check["tpr"] >= 0.9 and with_check["tpr"] > without["tpr"]
    assert with_check["fpr"] <= 0.15
    assert on.threshold >= off.threshold  # the support's drops join its scores: the threshold never falls
    # predict goes through the same scores
    rows = on.predict(backdoored.test_triggered[:10])
    np.testing.assert_allclose([r["score"] for r in rows], s_t[:10], atol=1e-5)


@pytest.mark.slow
def test_the_pipeline_flags_with_the_erase_check(digits_models, detector):
    from transformers import pipeline

    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    pipe = pipeline("backdoor-detection", target_model=backdoored.model, clean_samples=clean)
    assert pipe.shield.erase is not None
    rows = pipe(list(backdoored.test_triggered[:40]))
    expected = pipe.shield.score(backdoored.test_triggered[:40])
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=1e-5)


def test_gate_leaves_the_check_off_when_erasing_moves_clean_samples(digits_models, detector):
    backdoored, _ = digits_models
    shield = adapt(detector, backdoored.model, backdoored.clean_pool[:20], positives="pseudo", seed=0)
    assert shield.erase is None and shield.erase_note == "no synthesized positives"
    adapter = shield.target
    items = adapter.prepare_items(backdoored.clean_pool[:20])
    check = EraseCheck(torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), backdoored.target_label)
    threshold = shield.threshold
    flips = np.zeros(20)
    flips[:2] = ERASE_FLIP_DROP  # 2 of 20 clean samples flip: more than max(1, 0.05 * 20)
    assert not use_erase(shield, check, flips)
    assert shield.erase is None and "flips 2 of 20" in shield.erase_note and shield.threshold == threshold
    drops = np.zeros(20)
    drops[3] = 0.99  # one clean sample's drop joins its score and lifts the threshold
    assert use_erase(shield, check, drops)
    assert shield.erase is check and shield.calibration_scores[3] == pytest.approx(0.99)
    # the whole input erased to black: the check's drops are real forward passes of the model
    d = check.drops(adapter, items)
    assert d.shape == (20,) and ((d >= 0) & (d <= 1)).all()


def test_no_check_without_an_input_space_mask():
    assert EraseCheck.from_positives(None, [], None)[0] is None
    found = SynthesizedPositives(None, [], "token_triggers", "no trigger")
    check, reason = EraseCheck.from_positives(None, [], found)
    assert check is None and "input space" in reason
    with pytest.raises(ValueError, match="erase must be one of"):
        adapt(load_detector(one_pass=True), load_target(torch.nn.Linear(4, 3)), torch.randn(6, 4), erase="on")
