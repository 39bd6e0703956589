"""Trigger-agnostic evidence of the scan: the per-class maximum margin (MM-BD) and the feature-space trigger inversion,
known answers on the digits BadNets model, its clean twin and a SIG (whole-image sinusoid) model trained here, and
their wiring into `scan_model` without changing what the shipped head scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import build_text_model, planted_digits_model
from metashield_hf.scan import (
    AGNOSTIC,
    BLEND,
    FEATURE_SIGNALS,
    MAX_MARGIN_SIGNALS,
    SIGNALS,
    ScanConfig,
    ScanHead,
    invert_features,
    logit_margins,
    max_margin_signals,
    max_margins,
    scan_model,
)
from metashield_hf.targets import load_target
from test_pipeline import clean_sentences

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(model, items):
    adapter = load_target(model)
    return adapter, adapter(items).logits.argmax(-1)


def test_logit_margins_known_answer():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert logit_margins(logits, torch.tensor([0, 0])).tolist() == [1.0, -5.0]
    assert logit_margins(logits, torch.tensor([2, 1])).tolist() == [-1.0, 5.0]
    # the class with the outlying margin is the one the signals describe; all-equal margins are no outlier
    signals = max_margin_signals(np.array([10.0, 2.0, 2.5, 3.0, 2.0]))
    assert set(signals) == set(MAX_MARGIN_SIGNALS) and signals["max_margin_excess"] > 5.0
    assert max_margin_signals(np.full(5, 2.0))["max_margin_log_z"] == 0.0


@pytest.mark.slow
def test_max_margin_singles_out_the_badnets_target(digits_models):
    backdoored, clean = digits_models
    results = []
    for example in (backdoored, clean):
        items = list(example.clean_pool[:20])
        adapter, _ = _adapter(example.model, items)
        results.append(max_margins(adapter, items, 10, steps=ScanConfig().max_margin_steps or 20, seed=0))
    bd, ok = results
    assert int(np.argmax(bd.margins)) == backdoored.target_label
    assert bd.anomaly[backdoored.target_label] > ok.anomaly.max()
    # the maximising inputs stay inside the domain (the clean pixels' range, [0, 1] for digits)
    assert bd.inputs.shape == (10, 1, 8, 8) and 0.0 <= float(bd.inputs.min()) and float(bd.inputs.max()) <= 1.0


@pytest.mark.slow
def test_feature_inversion_reaches_the_badnets_target_with_the_shortest_shift(digits_models):
    backdoored, clean = digits_models
    items = list(backdoored.clean_pool[:20])
    adapter, pred = _adapter(backdoored.model, items)
    result = invert_features(adapter, items, pred, 10, steps=20, seed=0)
    assert result.layer == "features.5" and result.spread > 0.0  # the middle of the 4 blocks of TinyCNN
    assert int(np.argmin(result.sizes)) == backdoored.target_label and result.reached[backdoored.target_label]
    assert all(0.0 <= f <= 1.0 for f in result.flip_rates)
    with pytest.raises(ValueError, match="depth must be in"):
        invert_features(adapter, items, pred, 10, depth=1.5)


@pytest.fixture(scope="module")
def digits_sig_model():
    """The bundled digits TinyCNN recipe poisoned with SIG (a horizontal sinusoid over the whole image, amplitude 0.2,
    10% of the rows, target 5), a whole-image trigger; it forces the target on about three quarters of the triggered
    inputs after 30 epochs."""
    from metashield_hf.attacks import ATTACKS

    return planted_digits_model(ATTACKS.build("sig", delta=0.2, frequency=2), 5)


@pytest.mark.slow
def test_max_margin_singles_out_a_sig_target(digits_sig_model, digits_models):
    model, clean, target, asr = digits_sig_model
    assert asr > 0.7
    report = scan_model(model, clean, seed=0)
    margins = [c.max_margin for c in report.per_class]
    assert int(np.argmax(margins)) == target
    ok = scan_model(digits_models[1].model, digits_models[1].clean_pool[:20], seed=0)
    assert report.signals["max_margin_excess"] > ok.signals["max_margin_excess"]


@pytest.mark.slow
def test_scan_scores_the_sources_with_the_agnostic_part(digits_models):
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:20]
    plain = scan_model(backdoored.model, clean, seed=0, max_margin_steps=0, feature_steps=0)
    both = scan_model(backdoored.model, clean, seed=0, max_margin_steps=10, feature_steps=10)
    # a scan with the max-margin signals is scored by the shipped head's image/agnostic part, which weighs the
    # dormancy (on in both scans); one without them by the blend part, as before the sources existed
    head = ScanHead.load()
    agnostic = head.for_modality("image", both.signals, AGNOSTIC)
    assert head.part_key("image", both.signals, AGNOSTIC) == f"image/{AGNOSTIC}"
    assert "dormant_log_z" in {n for n, w in agnostic.weights.items() if w} and "dormant_log_z" in plain.signals
    assert both.score == pytest.approx(agnostic.score(both.signals)) and both.threshold == agnostic.threshold
    assert plain.score == pytest.approx(head.for_modality("image", plain.signals, BLEND).score(plain.signals))
    assert set(MAX_MARGIN_SIGNALS + FEATURE_SIGNALS) <= set(SIGNALS)
    assert plain.signals == {k: both.signals[k] for k in plain.signals}
    assert set(both.signals) - set(plain.signals) == set(MAX_MARGIN_SIGNALS + FEATURE_SIGNALS)
    assert {"max_margin_s", "feature_s"} <= set(both.timings) and not {"max_margin_s", "feature_s"} & set(
        plain.timings
    )
    assert both.options["max_margin_steps"] == 10 and both.options["feature_layer"] == "features.5"
    assert plain.options["max_margin_steps"] == 0 and plain.options["feature_steps"] == 0
    assert all(c.max_margin is not None and c.feature_size is not None for c in both.per_class)
    assert all(c.max_margin is None and c.feature_anomaly is None for c in plain.per_class)
    assert both.to_dict()["per_class"][0]["max_margin_z"] == both.per_class[0].max_margin_z


def test_text_models_get_both_sources_through_the_adapter(wordpiece_tokenizer):
    """Every family through its adapter: a text model's domain is its embedding layer and its blocks its encoder's."""
    model = build_text_model("bert", len(wordpiece_tokenizer))
    clean = clean_sentences(8, 0)
    report = scan_model(
        model, clean, processor=wordpiece_tokenizer, seed=0, steps=5, max_margin_steps=3, feature_steps=3
    )
    assert set(MAX_MARGIN_SIGNALS + FEATURE_SIGNALS) <= set(report.signals)
    assert all(np.isfinite(c.max_margin) and np.isfinite(c.feature_size) for c in report.per_class)
    assert report.options["feature_layer"]
    assert not any(p.grad is not None for p in model.parameters())  # the sources leave the model untouched


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_margin_steps": -1}, "max_margin_steps must be >= 0"),
        ({"feature_steps": -2}, "feature_steps must be >= 0"),
        ({"max_margin_starts": 0}, "max_margin_starts must be >= 1"),
        ({"feature_depth": 1.5}, "feature_depth must be in"),
    ],
)
def test_config_refuses_bad_budgets(changes, message):
    with pytest.raises(ValueError, match=message):
        ScanConfig(**changes)
