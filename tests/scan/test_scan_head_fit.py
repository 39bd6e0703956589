"""The scan head's fitting on scan records: the shipped head is rebuilt from the committed records (every number to
1e-9), the committed held-out table is what the shipped head scores on them, and false-positive thresholds flag what
they say."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from metashield_hf.scan import (
    DEFAULT_SCAN_HEAD,
    SYNTHESIS_SIGNALS,
    ScanHead,
    fit_head_from_spec,
    fit_heads,
    out_of_fold_scores,
    read_records,
    record_variant,
    score_record,
    set_fpr_thresholds,
    verdict_threshold,
)

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "scan"
RECORDS = STUDY / "results" / "records"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_the_shipped_head_is_rebuilt_from_the_committed_records(tmp_path):
    spec = yaml.safe_load((STUDY / "configs" / "head.yaml").read_text())
    # the agnostic part's full choice (24 candidates, results/head_fit.md) is benchmarks/scan/fit_head.py's minutes;
    # here it chooses between its base alone and the shipped winner at the winner's C, which must still win and
    # rebuild the shipped part (every candidate's cross-validation is seeded, so its scores do not depend on the others)
    agnostic = spec["parts"]["agnostic"]
    assert set(agnostic["extra"]) >= {"dormant_log_z"} and 0.1 in agnostic["cs"]
    agnostic.update(extra=["dormant_log_z"], groups=[], cs=[0.1])
    # the target chooser likewise: the anomaly index alone (always a candidate) against the shipped winner's features
    winner = list(json.loads(DEFAULT_SCAN_HEAD.read_text())["by_modality"]["image/agnostic"]["target"])
    assert winner in agnostic["target"]["candidates"]
    agnostic["target"].update(candidates=[winner], cs=[0.1])
    fit = fit_head_from_spec(spec, RECORDS)
    for name, choice in fit.parts.items():
        assert {record_variant(r) for r in fit.part_rows[name]} == {name}  # every row is a scan of the part's variant
        # the threshold flags the asked share of the clean train rows by the cross-validation that chose the part
        assert 0.5 < choice.part.threshold < 1.0
    assert set(fit.parts) == {"blend", "source", "agnostic"}
    # the rule keeps a part out of the shipped head unless it gains over its base signals; the agnostic part gains
    # with the dormancy's log ratio
    assert not fit.declined and "dormant_log_z" in fit.head.by_modality["image/agnostic"]["weights"]
    fit.head.save(tmp_path / "head.json")
    rebuilt, shipped = (json.loads(p.read_text()) for p in (tmp_path / "head.json", DEFAULT_SCAN_HEAD))
    # the same keys, strings and layout; numbers to 1e-9 (the last digits of a float move with the BLAS build)
    assert _close(rebuilt, shipped)


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_the_committed_held_out_table_is_the_shipped_heads_score_of_the_records():
    """``results/held_out.md``'s MetaShield AUROC per domain is the shipped head's over the held-out records (image
    rows: their rescans with the default blend synthesis), and its accuracy compares each score with its part's
    threshold, as ``scan_model`` does."""
    head = ScanHead.load()
    standard = {r["model_id"]: r for r in read_records(RECORDS / "standard.jsonl")}
    for name in ("standard_cv_blend.jsonl", "standard_fl_blend.jsonl"):
        for r in read_records(RECORDS / name):
            if r["model_id"] in standard:
                assert r["metashield"]["signals"]["anomaly_excess"] == pytest.approx(
                    standard[r["model_id"]]["metashield"]["signals"]["anomaly_excess"], abs=1e-9
                )
                standard[r["model_id"]]["metashield"] = r["metashield"]
    table = (STUDY / "results" / "held_out.md").read_text()
    for domain in ("cv", "fl", "nlp"):
        rows = [r for r in standard.values() if r["split"] == "test" and r["domain"] == domain]
        y = [int(r["is_backdoored"]) for r in rows]
        s = [score_record(head, r) for r in rows]
        line = re.search(
            rf"^\| {domain} \(\d+, \d+ bd\) \| MetaShield scan \| ([0-9.]+) \[.*?\] \| ([0-9.]+) \|", table, re.M
        )
        assert line, domain
        assert float(line.group(1)) == pytest.approx(roc_auc_score(y, s), abs=5e-4), domain
        hits = np.mean([(v > verdict_threshold(head, r)) == bool(t) for v, r, t in zip(s, rows, y, strict=True)])
        assert float(line.group(2)) == pytest.approx(hits, abs=5e-4), domain


def test_fpr_thresholds_flag_the_asked_share_of_clean_train_models():
    """Each part's threshold flags that share of the clean train models it scores, by their out-of-fold scores; the
    image head and the text part each get their own."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(160):
        bd, text = i % 2 == 1, i % 4 >= 2
        shift = 1.0 if bd else 0.0
        names = ("token_logit_2", "token_detector") if text else SYNTHESIS_SIGNALS
        signals = {s: rng.normal(shift) for s in names}
        records.append({"domain": "nlp" if text else "cv", "is_backdoored": bd, "metashield": {"signals": signals}})
    text_signals = ("token_logit_2", "token_detector")
    head = fit_heads(records, 1.0, text_signals)
    runs = out_of_fold_scores(records, 1.0, text_signals, repeats=4)
    thresholds = set_fpr_thresholds(head, records, runs, 0.1)
    assert set(thresholds) == {"image", "text"} and thresholds["image"] != thresholds["text"]
    assert head.threshold == thresholds["image"] and head.by_modality["text"]["threshold"] == thresholds["text"]
    for key, text in (("image", False), ("text", True)):
        clean = np.array([not r["is_backdoored"] and (r["domain"] == "nlp") == text for r in records])
        flagged = np.mean([(scores[clean] > thresholds[key]).mean() for scores in runs])
        assert flagged == pytest.approx(0.1, abs=0.02), key
