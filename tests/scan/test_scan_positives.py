"""Synthesized positives (issue [3/5]): the scan's synthesis feeding adaptation's inner loop, one code path for both;
the scan report's model fingerprint; the threshold's expected FPR and the small-k warning."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from scipy.stats import beta

from builders import build_image_model, build_text_model
from metashield_hf import scan_model
from metashield_hf.cli import main
from metashield_hf.scan import ScanConfig
from metashield_hf.scan.positives import model_fingerprint, positives_from_report, synthesized_positives
from metashield_hf.shield import adapt, expected_fpr
from metashield_hf.targets import load_target
from test_pipeline import clean_sentences, digit_images

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- synthesis as the inner loop's positives ------------------------------------------------------------------
@pytest.mark.slow
def test_synthesized_positives_force_the_backdoor_target(digits_models, detector):
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    shield = adapt(detector, backdoored.model, clean, positives="synthesized", seed=0)
    found = shield.positives
    assert found.source == "synthesis" and found.classes == [backdoored.target_label] and not found.reason
    # the positives are the 20 clean samples with the target's synthesized trigger: the model reads them as the target
    assert found.outputs.logits.shape == (20, 10)
    assert (found.outputs.logits.argmax(-1) == backdoored.target_label).float().mean() >= 0.9
    pseudo = adapt(detector, backdoored.model, clean, positives="pseudo", seed=0)
    assert pseudo.positives is None
    # different positives, different adapted weights: the scores of the same inputs move
    test = backdoored.test_triggered[:50]
    assert not np.allclose(shield.score(test), pseudo.score(test))


@pytest.mark.slow
def test_scan_report_hands_its_synthesis_to_adapt(digits_models, detector):
    """One synthesis code path: a scan's report gives the inner loop what `positives="synthesized"` would have
    synthesized itself (same budget, same seed), and it refuses a report of another model."""
    backdoored, clean_model = digits_models
    clean = backdoored.clean_pool[:20]
    report = scan_model(backdoored.model, clean, seed=0)
    assert report.fingerprint == model_fingerprint(backdoored.model)
    assert json.loads(report.to_json())["fingerprint"] == report.fingerprint
    reused = report.shield(detector, backdoored.model, clean, seed=0)
    fresh = adapt(detector, backdoored.model, clean, positives="synthesized", seed=0)
    assert reused.positives.source == "scan_report" and reused.positives.classes == fresh.positives.classes
    torch.testing.assert_close(reused.positives.outputs.logits, fresh.positives.outputs.logits)
    assert reused.threshold == pytest.approx(fresh.threshold)

    other = scan_model(clean_model.model, clean_model.clean_pool[:20], seed=0, steps=5)
    with pytest.raises(ValueError, match="another model"):
        adapt(detector, backdoored.model, clean, scan_report=other)


def test_synthesis_that_reaches_no_class_falls_back_to_pseudo_anomalies(detector, caplog):
    model, processor = build_image_model("resnet")
    adapter = load_target(model, processor)
    images = digit_images(8, 0)
    items = adapter.prepare_items(images)
    budget = ScanConfig(steps=1, flip_threshold=1.0, lr=1e-6)  # one tiny step cannot flip every sample
    found = synthesized_positives(adapter, items, config=budget)
    assert found.outputs is None and found.classes == [] and "no class" in found.reason
    with caplog.at_level(logging.WARNING, logger="metashield_hf.shield"):
        shield = adapt(detector, adapter, images, positives="synthesized", synthesis=budget, seed=0)
    assert shield.positives.outputs is None and "pseudo-anomalies" in caplog.text
    pseudo = adapt(detector, adapter, images, positives="pseudo", seed=0)
    assert shield.threshold == pytest.approx(pseudo.threshold)  # the fallback is exactly today's inner loop


def test_auto_positives_synthesize_for_images_and_tensors_not_text(detector):
    from metashield_hf.scan import positives_for

    assert positives_for("auto", "image") == positives_for("auto", "tensor") == "synthesized"
    assert positives_for("auto", "text") == "pseudo" and positives_for("pseudo", "image") == "pseudo"
    with pytest.raises(ValueError, match="positives must be one of"):
        positives_for("oracle", "image")
    model, processor = build_image_model("resnet")
    budget = ScanConfig(steps=2)
    shield = adapt(detector, model, digit_images(8, 0), processor=processor, positives="auto", synthesis=budget)
    assert shield.positives is not None and shield.positives.source == "synthesis"


def test_bad_positives_and_fingerprints(detector):
    model, processor = build_image_model("resnet")
    with pytest.raises(ValueError, match="positives must be one of"):
        adapt(detector, model, digit_images(5, 0), processor=processor, positives="triggered")
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(load_target(model, processor)) and len(fp) == 16
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(model) != fp


def test_token_only_text_report_gives_token_trigger_positives(wordpiece_tokenizer, tmp_path):
    folder = tmp_path / "bert"
    build_text_model("bert", len(wordpiece_tokenizer)).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    texts = clean_sentences(8, 0)
    report = scan_model(str(folder), texts, synthesis=False, use_detector=False, seed=0)
    assert report.synthesis is None and report.space == "tokens"
    adapter = load_target(str(folder))
    found = positives_from_report(report, adapter, texts)
    assert found.source == "token_triggers" and found.classes[0] == report.suspected_target
    assert found.outputs.logits.shape == (8, len(report.per_class))
    report.fingerprint = "0" * 16
    with pytest.raises(ValueError, match="another model"):
        positives_from_report(report, adapter, texts)
    report.fingerprint = None
    with pytest.raises(ValueError, match="no model fingerprint"):
        positives_from_report(report, adapter, texts)


# ---- the threshold's honesty -------------------------------------------------------------------------------------
def test_expected_fpr_is_the_beta_law_of_the_rank():
    scores = np.arange(1.0, 21.0)  # 20 calibration scores
    est = expected_fpr(scores, 19.0)  # at the 19th smallest: Beta(2, 19)
    assert est["mean"] == pytest.approx(2 / 21) and est["p90"] == pytest.approx(beta.ppf(0.9, 2, 19))
    assert est["n"] == 20 and est["smallest_honest_fpr"] == pytest.approx(1 / 21)
    half = expected_fpr(scores, 19.5)  # halfway to the 20th: the two laws interpolated
    assert half["mean"] == pytest.approx(1.5 / 21)
    assert half["p90"] == pytest.approx((beta.ppf(0.9, 2, 19) + beta.ppf(0.9, 1, 20)) / 2)
    assert expected_fpr(scores, 20.0)["mean"] == pytest.approx(1 / 21)  # the largest score: the smallest honest rate
    assert expected_fpr(scores, 0.0)["mean"] == 1.0  # below every clean score: everything is flagged
    # the interpolated 95th percentile, what adapt's default rule takes, sits between the 19th and 20th ranks
    q = expected_fpr(scores, float(np.quantile(scores, 0.95)))
    assert 1 / 21 < q["mean"] < 2 / 21


def test_small_k_warns_once_with_the_smallest_honest_rate(detector, caplog):
    model, processor = build_image_model("resnet")
    images = digit_images(10, 1)
    with caplog.at_level(logging.WARNING, logger="metashield_hf.shield"):
        shield = adapt(detector, model, images, processor=processor, steps=0, target_fpr=0.03)
        adapt(detector, model, images, processor=processor, steps=0, target_fpr=0.03, seed=1)
    said = [r.getMessage() for r in caplog.records if "smallest honest rate" in r.getMessage()]
    assert len(said) == 1 and "1/(k+1) = 0.091" in said[0] and "at least 33 clean samples" in said[0]
    assert shield.fpr_estimate["smallest_honest_fpr"] == pytest.approx(1 / 11)
    assert shield.fpr_estimate["mean"] >= 1 / 11


# ---- the flow, from the CLI --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_detect_scan_first_reports_the_scan_and_the_positives(capsys):
    assert main(["detect", "--json", "--scan_first"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scan"]["verdict"] == "backdoored" and out["positives"].startswith("scan_report")
    assert 0.0 < out["expected_fpr"]["mean"] <= out["expected_fpr"]["p90"] < 1.0
    assert main(["detect", "--positives", "oracle"]) == 2


@pytest.mark.slow
def test_pipeline_scan_first(digits_models):
    from transformers import pipeline

    import metashield_hf  # noqa: F401  (registers the task)

    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    detect = pipeline("backdoor-detection", target_model=backdoored.model, clean_samples=clean, scan_first=True)
    assert detect.scan_report.verdict == "backdoored"
    assert detect.shield.positives.source == "scan_report"
    assert detect.shield.positives.classes == [detect.scan_report.suspected_target]
    flagged = [r["label"] for r in detect(backdoored.test_triggered[:40])]
    assert len(flagged) == 40 and set(flagged) <= {"clean", "backdoored"}
