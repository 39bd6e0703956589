"""Adaptation: honest thresholds, determinism, and a clear error for every bad input the issue lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import NUM_LABELS, build_image_model, build_text_model
from metashield_hf import adapt, load_detector
from metashield_hf.shield import calibrate_threshold
from metashield_hf.zoo.examples import TinyCNN
from test_pipeline import clean_sentences, digit_images


@pytest.fixture(scope="module")
def detector():
    return load_detector()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return TinyCNN(num_classes=NUM_LABELS).eval()


def digits(n: int, offset: int = 0) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[offset : offset + n], dtype=torch.float32)[:, None] / 16.0


def test_threshold_is_the_leave_one_out_quantile(detector, cnn):
    shield = adapt(detector, cnn, digits(20), target_fpr=0.1)
    assert shield.calibration_scores.shape == (20,)
    assert shield.threshold == pytest.approx(np.quantile(shield.calibration_scores, 0.9))
    # Leave-one-out: re-scoring clean sample i against all 20 (itself included) gives a different, lower score.
    inside = shield.score_features(shield.reference_features[:1]).item()
    assert inside != pytest.approx(shield.calibration_scores[0])


def test_conformal_threshold_known_answers():
    scores = np.arange(1, 21, dtype=float)  # 20 clean scores 1..20
    assert calibrate_threshold(scores, 0.05, "conformal") == 20.0  # ceil(21*0.95) = 20 -> the largest
    assert calibrate_threshold(scores, 0.25, "conformal") == 16.0  # ceil(21*0.75) = 16
    with pytest.raises(ValueError, match="calibration must be"):
        calibrate_threshold(scores, 0.05, "magic")


def test_normal_and_tolerance_thresholds_known_answers():
    logits = np.array([-1.0, 0.0, 1.0])  # mean 0, sample sd 1
    scores = 1 / (1 + np.exp(-logits))
    normal = calibrate_threshold(scores, 0.05, "normal")
    assert normal == pytest.approx(1 / (1 + np.exp(-1.6448536)), rel=1e-6)  # sigmoid(z_0.95)
    # n = 3, p = 0.95, confidence 0.9: the one-sided normal tolerance factor is 5.311 (Natrella's tables)
    assert calibrate_threshold(scores, 0.05, "tolerance") == pytest.approx(1 / (1 + np.exp(-5.311)), rel=1e-3)
    rng = np.random.default_rng(0)
    big = 1 / (1 + np.exp(-rng.normal(0.5, 2.0, 20000)))  # with many samples both rules meet the asked rate
    for rule in ("normal", "tolerance"):
        assert (big > calibrate_threshold(big, 0.05, rule)).mean() == pytest.approx(0.05, abs=0.005)


def test_same_seed_same_scores(detector, cnn):
    x = digits(30)
    a = adapt(detector, cnn, x[:20], seed=3).score(x[20:])
    b = adapt(detector, cnn, x[:20], seed=3).score(x[20:])
    np.testing.assert_array_equal(a, b)


def test_inner_loop_steps_adapt_parameters_deterministically(detector, cnn):
    x = digits(30)
    s0 = adapt(detector, cnn, x[:20], steps=0)
    s3 = adapt(detector, cnn, x[:20], steps=3, seed=1)
    again = adapt(detector, cnn, x[:20], steps=3, seed=1)
    assert s0.params is None and s3.params is not None
    changed = [k for k, v in s3.params.items() if not torch.equal(v, dict(detector.named_parameters())[k])]
    assert changed, "the inner loop did not move any parameter"
    np.testing.assert_array_equal(s3.score(x[20:]), again.score(x[20:]))
    assert all(p.requires_grad for p in detector.parameters())  # the detector itself is untouched


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_clean_samples(detector, cnn, n):
    with pytest.raises(ValueError, match="need at least 3 clean samples"):
        adapt(detector, cnn, digits(n) if n else [])


def test_clean_samples_of_another_modality(detector):
    model, processor = build_image_model("vit")
    with pytest.raises(ValueError, match="expects images"):
        adapt(detector, model, ["some text"] * 6, processor=processor)


def test_images_for_a_text_model(detector, wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    with pytest.raises(ValueError, match="text"):
        adapt(detector, model, digit_images(6, 0), processor=wordpiece_tokenizer)


def test_grey_images_of_another_size_are_converted(detector):
    from PIL import Image

    model, processor = build_image_model("vit")
    grey = [Image.fromarray(np.full((20, 24), 40 * i, dtype=np.uint8), mode="L") for i in range(6)]
    shield = adapt(detector, model, grey, processor=processor)
    assert np.isfinite(shield.score(grey[:2])).all()


def test_wrong_tensor_shape_for_a_torch_model(detector, cnn):
    with pytest.raises(ValueError, match="shape"):
        adapt(detector, cnn, torch.rand(6, 3, 5))


def test_model_without_classification_head(detector, wordpiece_tokenizer):
    from builders import build_headless_bert

    backbone = build_headless_bert(len(wordpiece_tokenizer))
    with pytest.raises(ValueError, match="classification head|no .*head"):
        adapt(detector, backbone, clean_sentences(6, 0), processor=wordpiece_tokenizer)
    conv_only = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match="classification head|no .*head"):
        adapt(detector, conv_only, digits(6))


def test_nan_activations(detector):
    torch.manual_seed(0)
    model = TinyCNN(num_classes=NUM_LABELS).eval()
    with torch.no_grad():
        model.fc[0].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN|non-finite"):
        adapt(detector, model, digits(6))


def test_missing_folder_and_unknown_hub_id(detector, tmp_path):
    with pytest.raises((ValueError, OSError), match="does-not-exist"):
        adapt(detector, str(tmp_path / "does-not-exist"), clean_sentences(6, 0))
    with pytest.raises((ValueError, OSError), match="nobody/does-not-exist"):
        adapt(detector, "nobody/does-not-exist", clean_sentences(6, 0))


def test_bad_target_fpr(detector, cnn):
    with pytest.raises(ValueError, match="target_fpr"):
        adapt(detector, cnn, digits(6), target_fpr=1.5)


def test_calibration_copies_join_the_threshold_not_the_estimate(detector, cnn):
    plain = adapt(detector, cnn, digits(20), target_fpr=0.1, seed=1, positives="pseudo")
    shield = adapt(detector, cnn, digits(20), target_fpr=0.1, seed=1, positives="pseudo", calibration_copies=3)
    assert shield.augmented_scores.shape == (60,)
    np.testing.assert_allclose(shield.calibration_scores, plain.calibration_scores)  # copies change no LOO score
    pooled = np.concatenate([shield.calibration_scores, shield.augmented_scores])
    assert shield.threshold == pytest.approx(np.quantile(pooled, 0.9))
    assert shield.fpr_estimate["n"] == 20  # copies are not new draws of the clean distribution
    assert not np.allclose(shield.augmented_scores, np.repeat(shield.calibration_scores, 3))


def test_an_unchanged_copy_scores_as_its_origin_left_out(detector, cnn):
    from metashield_hf.shield import augmented_scores
    from metashield_hf.targets.base import TargetOutput

    shield = adapt(detector, cnn, digits(12), seed=2, positives="pseudo")
    ref = shield.reference
    order = torch.arange(12).flip(0)  # copies in any order, each scored against the reference without its origin
    copies = augmented_scores(shield, TargetOutput(ref.logits[order], ref.penultimate[order]), order)
    np.testing.assert_allclose(copies, shield.calibration_scores[order.numpy()], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clean sample 12"):
        augmented_scores(shield, TargetOutput(ref.logits[:1], ref.penultimate[:1]), torch.tensor([12]))


def test_calibration_copies_on_a_text_model(detector, wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    shield = adapt(detector, model, clean_sentences(10, 0), processor=wordpiece_tokenizer, calibration_copies=2)
    assert shield.augmented_scores.shape == (20,)
    assert np.isfinite(shield.augmented_scores).all()
    with pytest.raises(ValueError, match="calibration_copies must be >= 0"):
        adapt(detector, model, clean_sentences(10, 0), processor=wordpiece_tokenizer, calibration_copies=-1)


def test_augment_perturbation_per_modality():
    from metashield_hf.targets.perturb import InputRange, augment

    rng = np.random.default_rng(0)
    dropped = augment("text", "the cat sat on the mat", rng)
    assert len(dropped.split()) == 5 and set(dropped.split()) <= {"the", "cat", "sat", "on", "mat"}
    assert sorted(augment("text", "two words", rng).split()) == ["two", "words"]
    assert augment("text", "one", rng) == "one"
    img = torch.zeros(3, 32, 32)
    img[:, 16, 16] = 1.0
    out = augment("image", img, rng)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    y, x = divmod(int(out[0].argmax()), 32)
    assert abs(y - 16) <= 2 and abs(x - 16) <= 2  # shifted by at most H/16 = 2 pixels
    t = torch.linspace(-3, 3, 50)
    noisy = augment("tensor", t, rng, bounds=InputRange(-3.0, 3.0))
    assert 0 < (noisy - t).abs().max() < 0.6 and noisy.min() >= -3
