"""A detector that reads live evidence: adaptation fits the probes, scoring appends their features to ψ, and live
episodes (what it is meta-trained and evaluated on) are deterministic and hold every method's scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metashield_hf import MetaShieldConfig, MetaShieldDetector, adapt
from metashield_hf.evaluation.live import episode_from_live, live_episode
from metashield_hf.features import feature_names
from metashield_hf.probes import DEFAULT_PROBES, LiveEvidence
from metashield_hf.targets import load_target
from metashield_hf.zoo.examples import digits_badnets_example


@pytest.fixture(scope="module")
def example():
    return digits_badnets_example()


def live_detector(probes=DEFAULT_PROBES) -> MetaShieldDetector:
    torch.manual_seed(0)
    names = feature_names() + LiveEvidence(probes).feature_names
    return MetaShieldDetector(MetaShieldConfig(feature_names=names, probes=list(probes), adapt_steps=1)).eval()


def test_adapt_fits_the_probes_and_scores_psi_then_live_features(example):
    det = live_detector()
    support, x = example.clean_pool[:12], torch.cat([example.test_clean[:4], example.test_triggered[:4]])
    shield = adapt(det, example.model, support, seed=2)
    assert shield.evidence is not None and shield.evidence.extra_passes == 16
    assert shield.reference_features.shape == (12, det.config.feature_dim)
    out, feats = shield.features(x)
    psi_width = len(feature_names())
    torch.testing.assert_close(feats[:, psi_width:], shield.evidence.features(x))  # the live part, recomputed
    assert feats.shape == (8, det.config.feature_dim) and torch.isfinite(feats).all()
    scores = shield.score(x)
    assert scores.shape == (8,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, adapt(det, example.model, support, seed=2).score(x))  # seeded
    assert len(shield.predict(x)) == 8


def test_a_budget_below_the_probes_needs_is_an_error(example):
    with pytest.raises(ValueError, match=r"the probes need 16 extra forward passes per input .* probe_passes is 8"):
        adapt(live_detector(), example.model, example.clean_pool[:8], probe_passes=8)


def test_a_one_pass_detector_runs_no_probe(example):
    det = MetaShieldDetector(MetaShieldConfig(feature_names=feature_names())).eval()
    shield = adapt(det, example.model, example.clean_pool[:8])
    assert shield.evidence is None and det.config.probes == []


def test_a_detector_saved_with_probes_loads_them(tmp_path):
    det = live_detector(("trajectory", "superimposition"))
    det.save_pretrained(tmp_path)
    back = MetaShieldDetector.from_pretrained(tmp_path)
    assert back.config.probes == ["trajectory", "superimposition"] and back.config.probe_passes == 16
    assert back.config.feature_dim == len(feature_names()) + 3 * (6 + 2)  # value, z, rank of 6 + 2 statistics


def test_live_episode_is_deterministic_and_holds_every_method(example):
    target = load_target(example.model)
    clean = list(example.test_clean[:60])
    triggered = list(example.test_triggered[:60])
    labels = [0] * 60
    meta = {"model_id": "digits", "domain": "cv", "attack": "badnets", "is_backdoored": True}
    ep = live_episode(target, clean, triggered, labels, meta, k=10, seed=1, n_query=16)
    again = live_episode(target, clean, triggered, labels, meta, k=10, seed=1, n_query=16)
    f = len(ep["feature_names"])
    assert ep["support"].shape == (10, f) and ep["query"].shape == (32, f) and ep["pseudo"].shape == (10, f)
    torch.testing.assert_close(ep["query"], again["query"])
    assert set(ep["scores"]) >= {"strip", "scale_up", "ibd_psc", "ted", "mahalanobis"}
    assert all(s.shape == (32,) for s in ep["scores"].values())
    assert ep["labels"].tolist() == [0.0] * 16 + [1.0] * 16 and ep["extra_passes"] == 16
    # The support and the query never share an input, nor an input and its triggered twin.
    assert not set(ep["support_index"].tolist()) & set(ep["query_clean_index"].tolist())
    assert not set(ep["support_index"].tolist()) & set(ep["query_triggered_index"].tolist())
    psi = episode_from_live(ep, range(len(feature_names())))
    assert psi.query.shape == (32, len(feature_names())) and psi.inner_anomalies.shape[0] == 10
    tact = live_episode(target, clean, triggered, [i % 10 for i in range(60)],
                        {**meta, "attack_params": '{"source_classes": [1, 2]}'}, k=10, seed=1, n_query=16,
                        baselines=())  # fmt: skip
    assert len(tact["query_triggered_index"]) < 16 and tact["scores"] == {}


def test_training_with_probes_needs_live_episodes(tmp_path):
    from metashield_hf.meta.train import MetaTrainArguments, train

    with pytest.raises(ValueError, match="live probes' features come from live episodes"):
        train(MetaTrainArguments(out=str(tmp_path / "run"), cache_dir=str(tmp_path), probes="trajectory"))


def test_live_episode_holds_synthesized_and_oracle_positives(example):
    """Meta-training as deployed: an episode stores the support with the scan's synthesized trigger (what adapt's
    `positives="synthesized"` makes, same seed) and, for a backdoored model, true triggers outside the query."""
    from metashield_hf.evaluation.live import episode_positives, score_live_episode
    from metashield_hf.scan import ScanConfig, synthesized_positives

    target = load_target(example.model)
    clean, triggered = list(example.test_clean[:80]), list(example.test_triggered[:80])
    meta = {"model_id": "digits", "domain": "cv", "attack": "badnets", "is_backdoored": True}
    budget = ScanConfig(steps=30)
    ep = live_episode(target, clean, triggered, [0] * 80, meta, k=10, seed=3, n_query=16, probes=(), baselines=(),
                      synthesis=budget)  # fmt: skip
    f = len(ep["feature_names"])
    assert ep["synthesized"].shape == (10, f) and ep["synthesized_classes"] == [example.target_label]
    assert ep["oracle"].shape[1] == f and 0 < len(ep["oracle"]) <= 20
    oracle_rows = set(range(80)) - set(ep["query_triggered_index"].tolist()) - set(ep["support_index"].tolist())
    assert len(ep["oracle"]) <= len(oracle_rows)
    # the same positives as adaptation's own synthesis on the same support and seed
    items = target.prepare_items([clean[i] for i in ep["support_index"].tolist()])
    found = synthesized_positives(target, items, config=budget, seed=3)
    assert found.classes == ep["synthesized_classes"]
    # a detector adapted with each kind of positives scores the query differently; a missing kind falls back
    det = MetaShieldDetector(MetaShieldConfig(feature_names=feature_names(), adapt_steps=2)).eval()
    pseudo, _ = score_live_episode(det, ep)
    synth, _ = score_live_episode(det, ep, positives="synthesized")
    assert pseudo.shape == synth.shape == (32,) and not np.allclose(pseudo, synth)
    clean_ep = {k: v for k, v in ep.items() if k != "oracle"}
    torch.testing.assert_close(episode_positives(clean_ep, "oracle"), ep["pseudo"])
    assert episode_from_live(ep, positives="synthesized").inner_anomalies.shape == (10, f)
    torch.testing.assert_close(episode_positives(ep, "auto"), ep["synthesized"])  # an image model: synthesized
    torch.testing.assert_close(episode_positives({**ep, "modality": "text"}, "auto"), ep["pseudo"])
    with pytest.raises(ValueError, match="positives must be one of"):
        episode_positives(ep, "triggered")
