import numpy as np
import pytest

from metashield_hf.evaluation.metrics import auroc, rates, tpr_at_fpr


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
