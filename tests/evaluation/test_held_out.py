"""Known answers for the held-out tables: ``summarize`` groups records and skips missing or NaN metrics."""

from __future__ import annotations

import math

import pytest

from metashield_hf.evaluation.held_out import render_variants, summarize


def test_summarize_by_hand():
    records = [
        {"domain": "cv", "tpr": 1.0, "fpr": 0.0},
        {"domain": "cv", "tpr": 0.5, "fpr": 0.1},
        {"domain": "nlp", "fpr": 0.2, "fpr_triggered": math.nan},
    ]
    table = summarize(records, by="domain")
    assert set(table) == {"all", "cv", "nlp"}
    assert table["cv"]["tpr"] == (0.75, 0.25, 2)
    assert table["all"]["fpr"] == pytest.approx((0.1, math.sqrt(2 / 300), 3))
    assert "tpr" not in table["nlp"] and "fpr_triggered" not in table["nlp"]  # missing and NaN are skipped


def test_render_variants_has_a_row_per_variant():
    rec = {"domain": "cv", "attack": "badnets", "k": 5, "tpr@5fpr": 1.0, "fpr": 0.0, "auroc": 1.0}
    text = render_variants([{**rec, "variant": "maml"}, {**rec, "variant": "pooled"}], {"seed": 0})
    assert "## Per domain, k = 5 clean samples" in text and "- seed: 0" in text
    assert (
        "| maml | 1.000 ± 0.000 / 0.000 ± 0.000 / 1.000 ± 0.000 | 1.000 ± 0.000 / 0.000 ± 0.000 / 1.000 ± 0.000 |"
        in text
    )
