"""score_client_updates and the update-level baselines on one tiny round (digits, one poisoned client)."""

from __future__ import annotations

import pytest
import torch
from fl_helpers import MALICIOUS, screened_round

from metashield_hf.fl import ClientScore, cosine_clusters, norm_outliers, robust_z, score_client_updates, to_deltas
from metashield_hf.fl.screen import candidate_state

pytestmark = pytest.mark.usefixtures("one_thread")


def test_robust_z_known_answer():
    z = robust_z([1.0, 1.1, 0.9, 1.0, 5.0])
    assert z[0] == 0.0 and z[4] == pytest.approx(4.0 / (1.4826 * 0.1))
    assert robust_z([2.0, 2.0, 2.0], min_scale=0.5).tolist() == [0.0, 0.0, 0.0]


def test_deltas_from_models_and_state_dicts_agree():
    g = {"w": torch.zeros(3), "step": torch.tensor(4)}
    local = {"w": torch.tensor([1.0, 2.0, 3.0]), "step": torch.tensor(9)}
    module = torch.nn.Linear(1, 1)
    assert to_deltas(g, [local], as_deltas=False)[0]["w"].tolist() == [1.0, 2.0, 3.0]
    assert "step" not in to_deltas(g, [local], as_deltas=False)[0]  # integer buffers are not updates
    assert candidate_state(g, {"w": torch.ones(3)})["step"] == 4
    with pytest.raises(ValueError, match="keys the global model lacks"):
        to_deltas(g, [module])
    with pytest.raises(ValueError, match="client_ids"):
        score_client_updates(torch.nn.Linear(2, 2), [{}], torch.zeros(5, 2), client_ids=[1, 2])
    with pytest.raises(ValueError, match="unknown signals"):
        score_client_updates(torch.nn.Linear(2, 2), [{}], torch.zeros(5, 2), signals=["mask_size"])
    with pytest.raises(TypeError, match="unknown scan options"):
        score_client_updates(torch.nn.Linear(2, 2), [{}], torch.zeros(5, 2), stepz=3)


def test_score_client_updates_flags_the_poisoned_client():
    model, deltas, _, clean, _ = screened_round()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_client_updates(model, deltas, clean[:10], client_ids=[10, 11, 12, 13, 14], seed=0)
    assert [s.client for s in scores] == [10, 11, 12, 13, 14] and all(isinstance(s, ClientScore) for s in scores)
    bad = scores[MALICIOUS]
    assert bad.flagged and bad.score == max(s.score for s in scores)
    assert not any(s.flagged for i, s in enumerate(scores) if i != MALICIOUS)
    assert bad.evidence["shift_class"] == 0 and bad.evidence["relative"]
    assert set(bad.evidence["z"]) == {"trigger_drift", "scan_score", "class_size_shift", "anomaly_index"}
    # the default score is the trigger drift, and it points at the poisoned target class (0)
    assert bad.score == bad.evidence["z"]["trigger_drift"] and bad.evidence["drift_class"] == 0
    cos = bad.evidence["mask_cosine_to_global"]
    assert len(cos) == 10 and cos[0] == min(cos) and all(-1.0 <= c <= 1.0 for c in cos)
    assert all(s.seconds > 0 for s in scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the global model is untouched
    # same seed, same scores
    again = score_client_updates(model, deltas[:3], clean[:10], seed=0, relative=False)
    assert [s.score for s in again] == [s.evidence["scan_score"] for s in scores[:3]]
    assert not again[0].evidence["relative"]


def test_norm_and_cosine_baselines_known_answers():
    deltas = [{"w": torch.tensor([1.0, 0.0]) * c} for c in (1.0, 1.1, 0.9, 1.0)] + [{"w": torch.tensor([0.0, 9.0])}]
    norm = norm_outliers(deltas, client_ids=list("abcde"))
    assert [s.flagged for s in norm] == [False] * 4 + [True] and norm[4].evidence["update_norm"] == 9.0
    cos = cosine_clusters(deltas)
    assert [s.flagged for s in cos] == [False] * 4 + [True]
    assert cos[4].evidence["median_cosine"] == pytest.approx(0.0) and cos[0].score == pytest.approx(0.0)
