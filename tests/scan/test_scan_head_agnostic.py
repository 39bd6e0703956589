"""The scan head's rule for new evidence: the leave-one-attack-out criterion prefers a signal that finds every attack
over one that finds only the train zoos' own, and a part that gains too little over its base stays out of the head.
Known answers on records built here (the record layout of `scan_record`), and the variant of a real scan."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metashield_hf.scan import scan_model, scan_record
from metashield_hf.scan.head import (
    choose_part,
    fit_head_from_spec,
    leave_attack_out_auroc,
    record_variant,
)
from metashield_hf.scan.signals import AGNOSTIC, BLEND, MAX_MARGIN_SIGNALS, SYNTHESIS_SIGNALS

GENERIC, SPECIFIC = "max_margin_excess", "anomaly_excess"


def _record(i: int, attack: str, backdoored: bool, signals: dict[str, float], split: str = "train") -> dict:
    return {
        "model_id": f"m{i}-{attack}",
        "domain": "cv",
        "dataset": "mnist",
        "attack": attack,
        "is_backdoored": backdoored,
        "num_classes": 10,
        "modality": "image",
        "split": split,
        "metashield": {"signals": signals, "blend_steps": 20, "max_margin_steps": 20, "source_steps": 0},
    }


def _rows(seed: int = 0, n_clean: int = 30, n_attack: int = 12) -> list[dict]:
    """Clean models, and three attacks: every backdoored model is high on GENERIC, only attack "patch" on SPECIFIC;
    every other signal is noise."""
    rng = np.random.default_rng(seed)
    names = (*SYNTHESIS_SIGNALS, *MAX_MARGIN_SIGNALS)
    rows = []
    for attack, n in (("none", n_clean), ("patch", n_attack), ("sinusoid", n_attack), ("filter", n_attack)):
        for _ in range(n):
            signals = {name: float(rng.normal()) for name in names}
            if attack != "none":
                signals[GENERIC] += 3.0
            if attack == "patch":
                signals[SPECIFIC] += 6.0
            rows.append(_record(len(rows), attack, attack != "none", signals))
    return rows


def test_leave_attack_out_auroc_rewards_the_signal_that_carries_over():
    rows = _rows()
    generic = leave_attack_out_auroc(rows, (GENERIC,), 1.0)
    specific = leave_attack_out_auroc(rows, (SPECIFIC,), 1.0)
    assert set(generic) == set(specific) == {"patch", "sinusoid", "filter"}
    assert min(generic.values()) > 0.9
    # the patch-only signal finds the patch attack only when a fit has seen it: held out, nothing carries over
    assert specific["sinusoid"] < 0.75 and specific["filter"] < 0.75
    assert np.mean(list(specific.values())) < np.mean(list(generic.values())) - 0.2


def test_choose_part_by_the_criterion_it_is_given():
    rows = _rows(1)
    candidates = [(SPECIFIC,), (GENERIC,)]
    by_attack = choose_part(rows, candidates, (1.0,), target_fpr=0.05, criterion="leave_attack_out")
    assert by_attack.signals == (GENERIC,) and by_attack.criterion == "leave_attack_out"
    assert set(by_attack.per_attack[((GENERIC,), 1.0)]) == {"patch", "sinusoid", "filter"}
    assert by_attack.score == by_attack.scores[((GENERIC,), 1.0)]
    # the part's threshold flags about 5% of the clean train rows out of fold
    assert 0.0 < by_attack.part.threshold < 1.0
    with pytest.raises(ValueError, match="criterion"):
        choose_part(rows, candidates, (1.0,), criterion="accuracy")


def _spec_files(tmp_path, rows: list[dict]) -> dict:
    (tmp_path / "standard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "base": {
            "standard": "standard.jsonl",
            "extra_train": [],
            "c": 1.0,
            "text_signals": [],
            "text_c": 1.0,
            "large_vocabulary_signals": [],
        },
        "parts": {
            AGNOSTIC: {
                "extra_train": ["part.jsonl"],
                "base": [SPECIFIC],
                "extra": list(MAX_MARGIN_SIGNALS),
                "with_base": True,
                "criterion": "leave_attack_out",
                "min_gain": 0.01,
                "cs": [1.0],
                "target_fpr": 0.05,
            }
        },
    }


def test_a_part_joins_the_head_only_when_it_gains_over_its_base(tmp_path):
    rows = _rows(2)
    fit = fit_head_from_spec(_spec_files(tmp_path, rows), tmp_path)
    assert f"image/{AGNOSTIC}" in fit.head.by_modality and AGNOSTIC not in fit.declined
    assert fit.parts[AGNOSTIC].signals[0] == SPECIFIC and GENERIC in fit.parts[AGNOSTIC].signals
    # the same rows with GENERIC made noise: the new signals add nothing, so the part stays out
    rng = np.random.default_rng(3)
    for r in rows:
        r["metashield"]["signals"][GENERIC] = float(rng.normal())
    fit = fit_head_from_spec(_spec_files(tmp_path, rows), tmp_path)
    assert f"image/{AGNOSTIC}" not in (fit.head.by_modality or {})
    assert "min_gain 0.01" in fit.declined[AGNOSTIC]
    spec = _spec_files(tmp_path, rows)
    spec["parts"][AGNOSTIC]["with_base"] = False
    with pytest.raises(ValueError, match="with_base"):
        fit_head_from_spec(spec, tmp_path)


def test_an_image_scan_with_the_max_margin_is_the_agnostic_variant(digits_models):
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:12]
    row = {"model_id": "digits", "domain": "cv", "dataset": "digits", "is_backdoored": True}
    rec = scan_record(scan_model(backdoored.model, clean, seed=0, steps=10, max_margin_steps=5), **row)
    assert rec["metashield"]["max_margin_steps"] == 5 and record_variant(rec) == AGNOSTIC
    rec = scan_record(scan_model(backdoored.model, clean, seed=0, steps=10, max_margin_steps=0), **row)
    assert rec["metashield"]["max_margin_steps"] == 0 and record_variant(rec) == BLEND
