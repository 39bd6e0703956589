"""Benchmark episodes: the log resumes where a run stopped, and the summary's cells are the known means."""

from __future__ import annotations

import numpy as np
import pytest

from metashield_hf.evaluation.episodes import EpisodeLog, summarize_episodes


def _episode(model_id, domain, k, seed, backdoored, fpr, tpr=None):
    entry = {"fpr_at_threshold": fpr}
    if tpr is not None:
        entry |= {"tpr_at_5fpr": tpr, "auroc": tpr, "tpr_at_threshold": tpr}
    return {"model_id": model_id, "domain": domain, "k": k, "seed": seed, "is_backdoored": backdoored, "m": entry}


def test_log_resumes_and_keeps_every_episode(tmp_path):
    log = EpisodeLog(tmp_path / "results" / "run")
    assert log.records == [] and log.todo("a", [10, 20], 2) == [(10, 0), (10, 1), (20, 0), (20, 1)]
    log.add(_episode("a", "cv", 10, 0, True, 0.1, 0.8))
    log.add(_episode("a", "cv", 20, 1, True, 0.0, 0.9))
    again = EpisodeLog(tmp_path / "results" / "run.md")  # the suffix is the log's own
    assert again.path == tmp_path / "results" / "run.jsonl"
    assert again.records == log.records and again.todo("a", [10, 20], 2) == [(10, 1), (20, 0)]
    assert again.todo("b", [10], 1) == [(10, 0)]


def test_summary_cells_are_the_means():
    records = [
        _episode("a", "cv", 10, 0, True, 0.1, 0.8),
        _episode("a", "cv", 10, 1, True, 0.3, 0.6),
        _episode("b", "nlp", 10, 0, False, 0.0),
        _episode("c", "nlp", 10, 0, True, 0.2, 0.4),
    ]
    s = summarize_episodes(records, ["m", "absent"])
    assert set(s) == {"cv|10|m", "nlp|10|m", "all|10|m"}
    assert s["cv|10|m"]["tpr_at_5fpr"] == pytest.approx(0.7) and s["cv|10|m"]["fpr_mean"] == pytest.approx(0.2)
    assert s["nlp|10|m"]["tpr_at_threshold"] == pytest.approx(0.4)  # the clean model counts for the FPR only
    assert s["nlp|10|m"]["fpr_mean"] == pytest.approx(0.1) and s["nlp|10|m"]["n_backdoored_episodes"] == 1
    cell = s["all|10|m"]
    assert cell["n_episodes"] == 4 and cell["n_backdoored_episodes"] == 3
    assert cell["auroc"] == pytest.approx(0.6)
    assert cell["fpr_p90"] == pytest.approx(np.quantile([0.1, 0.3, 0.0, 0.2], 0.9))
