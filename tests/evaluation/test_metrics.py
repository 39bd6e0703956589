from pathlib import Path

import numpy as np
import pytest

from metashield_hf.evaluation.metrics import (
    accuracy,
    auroc,
    auroc_interval,
    detection_metrics,
    load_metric,
    metric_path,
    rates,
    tpr_at_fpr,
)


def test_auroc_known_answers():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.8, 0.9, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    # one of four pairs inverted -> 0.75; ties count one half
    assert auroc([0.1, 0.6, 0.5, 0.9], [0, 0, 1, 1]) == 0.75
    assert auroc([0.5, 0.5], [0, 1]) == 0.5


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 10, 200).astype(float)  # many ties on purpose
    y = rng.integers(0, 2, 200)
    neg, pos = s[y == 0], s[y == 1]
    expected = (pos[:, None] > neg).mean() + 0.5 * (pos[:, None] == neg).mean()
    assert auroc(s, y) == pytest.approx(expected)


def test_auroc_interval_brackets_the_value_and_narrows_with_more_data():
    # perfectly separated: every resample is separated too, so the interval is the point
    assert auroc_interval([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], resamples=200) == (1.0, 1.0)
    rng = np.random.default_rng(1)

    def draw(n):  # overlapping scores: backdoored shifted up by one standard deviation
        y = np.r_[np.zeros(n), np.ones(n)]
        return rng.normal(size=2 * n) + y, y

    s, y = draw(12)
    low, high = auroc_interval(s, y, resamples=500)
    assert low < auroc(s, y) < high
    assert auroc_interval(s, y, resamples=500) == (low, high)  # seeded
    s_big, y_big = draw(400)
    low_big, high_big = auroc_interval(s_big, y_big, resamples=500)
    assert high_big - low_big < (high - low) / 2
    # the population AUROC of a one-sigma shift is Phi(1 / sqrt 2) = 0.760
    assert low_big < 0.760 < high_big
    with pytest.raises(ValueError, match="level"):
        auroc_interval(s, y, level=1.0)


def test_tpr_at_fpr_and_rates():
    neg = np.arange(100) / 100.0  # clean scores 0.00..0.99
    pos = np.array([0.5, 0.96, 0.97, 2.0])
    s, y = np.r_[neg, pos], np.r_[np.zeros(100), np.ones(4)]
    # at 5% FPR the threshold is the 6th largest clean score (0.94): 3 of 4 positives are above it
    assert tpr_at_fpr(s, y, 0.05) == 0.75
    assert rates(s, y, 0.955) == {"tpr": 0.75, "fpr": 0.04}


def test_metrics_reject_one_class():
    with pytest.raises(ValueError, match="at least one clean"):
        auroc([0.1, 0.2], [1, 1])


def test_accuracy_known_answers():
    # scan: 3 backdoored models (1) and 3 clean ones (0); one backdoored model missed, one clean one flagged
    scores, labels = [0.9, 0.7, 0.2, 0.1, 0.3, 0.6], [1, 1, 1, 0, 0, 0]
    assert accuracy(scores, labels, 0.5) == pytest.approx(4 / 6)
    assert accuracy(scores, labels, 0.95) == 0.5  # nothing flagged: every clean model right, every backdoored wrong


def test_detection_metrics_known_answers():
    # 100 clean scores 0.00..0.99 and 4 triggered ones, as in test_tpr_at_fpr_and_rates
    s = np.r_[np.arange(100) / 100.0, [0.5, 0.96, 0.97, 2.0]]
    y = np.r_[np.zeros(100), np.ones(4)]
    out = detection_metrics(s, y, threshold=0.955)
    # at 1% FPR the threshold is the 2nd largest clean score (0.98): only 2.0 is above it
    assert out["tpr@1fpr"] == 0.25
    assert out["tpr@5fpr"] == 0.75
    assert out["tpr"] == 0.75 and out["fpr"] == 0.04
    assert out["accuracy"] == pytest.approx((96 + 3) / 104)
    # AUROC: 0.5, 0.96 and 0.97 each beat 50, 96 and 97 clean scores and tie one (a half each); 2.0 beats all 100
    assert out["auroc"] == pytest.approx((50.5 + 96.5 + 97.5 + 100) / 400)
    assert set(detection_metrics(s, y)) == {"auroc", "tpr@1fpr", "tpr@5fpr"}  # no threshold: no thresholded metrics
    assert set(detection_metrics(s, y, fprs=(0.1,))) == {"auroc", "tpr@10fpr"}


def test_evaluate_module_ships_in_the_package_and_loads_offline(tmp_path, monkeypatch):
    import metashield_hf

    folder = metric_path()
    assert folder.parent.parent == Path(metashield_hf.__file__).resolve().parent  # inside the installed package
    assert (folder / "backdoor_detection.py").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub lookup would fail loudly
    metric = load_metric(cache_dir=str(tmp_path))
    assert metric.name == "backdoor_detection"
    out = metric.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1], threshold=0.5)
    assert out == {"auroc": 0.75, "tpr@1fpr": 0.5, "tpr@5fpr": 0.5, "tpr": 0.5, "fpr": 0.0, "accuracy": 0.75}
    # add_batch + compute, numpy inputs, as with any evaluate metric
    metric.add_batch(predictions=np.array([0.1, 0.9]), references=np.array([0, 1]))
    metric.add_batch(predictions=np.array([0.2]), references=np.array([1]))
    assert metric.compute(threshold=0.5) == detection_metrics([0.1, 0.9, 0.2], [0, 1, 1], threshold=0.5)
