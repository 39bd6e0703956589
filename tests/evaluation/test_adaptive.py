"""Adaptive attacks: TaCT's source-specific poisoning and covers, the latent-separability penalty, and the evaluation
episode that counts only the inputs a source-specific trigger fires on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metashield_hf.attacks import ATTACKS
from metashield_hf.evaluation.protocols import Evaluation, firing_rows
from metashield_hf.meta.cache import TaskActivations
from metashield_hf.targets.base import TargetOutput
from metashield_hf.zoo.vision import latent_penalty


def test_tact_poisons_source_classes_and_covers_the_others():
    attack = ATTACKS.build("tact", source_classes=[0, 1, 2], cover_rate=1.0, seed=3)
    labels = np.repeat(np.arange(6), 10)
    rows = attack.poison_rows(labels, 12, target=1, rng=np.random.default_rng(0))
    assert len(rows) == 12 and set(labels[rows]) <= {0, 2}  # source classes, never the target
    covers = attack.cover_rows(labels, len(rows), target=1, rng=np.random.default_rng(1))
    assert len(covers) == 12 and set(labels[covers]) <= {3, 4, 5}
    with pytest.raises(ValueError, match="only 20 rows of source classes"):
        attack.poison_rows(labels, 21, target=1, rng=np.random.default_rng(0))
    assert ATTACKS.build("tact", cover_rate=0.0).noise_mode is False


def test_latent_penalty_known_answer():
    h = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [4.0, 0.0]], requires_grad=True)
    labels = torch.tensor([3, 3, 3, 0])
    poisoned = torch.tensor([False, False, True, False])
    # centroid of clean target rows = (1, 0); poisoned row at distance 0 -> penalty 0
    assert latent_penalty(h, labels, poisoned, 3).item() == pytest.approx(0.0)
    h2 = h.detach().clone()
    h2[2] = torch.tensor([3.0, 0.0])  # distance² 4; clean spread: rows 0, 1, 3 -> (1 + 1 + 9) / 3
    assert latent_penalty(h2, labels, poisoned, 3).item() == pytest.approx(4.0 / (11.0 / 3.0))
    loss = latent_penalty(h, labels, poisoned, 3) + (h**2).sum() * 0
    loss.backward()
    assert h.grad is not None  # differentiable through the poisoned rows
    assert latent_penalty(h2, labels, torch.zeros(4, dtype=torch.bool), 3).item() == 0.0


def _tact_task(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    n, dim = 40, 8
    clean = torch.randn(n, dim, generator=g)
    w = torch.randn(3, dim, generator=g)
    params = {"name": "tact", "source_classes": [0, 1]}
    meta = {"model_id": "cv-mnist-test_resnet-tact-x", "domain": "cv", "architecture": "test_resnet"}
    meta |= {"attack": "tact", "is_backdoored": True, "attack_params": json.dumps(params)}
    labels = torch.arange(n) % 4  # classes 0..3; only 0 and 1 are sources
    tensors = {
        "clean_penultimate": clean,
        "clean_logits": clean @ w.T,
        "triggered_penultimate": clean + 2.0,
        "triggered_logits": (clean + 2.0) @ w.T,
        "labels": labels,
        "head_weight": w,
    }
    save_file(tensors, str(tmp_path / f"{meta['model_id']}.safetensors"), metadata={"meta": json.dumps(meta)})
    return meta["model_id"], labels


def test_source_specific_trigger_counts_only_firing_inputs(tmp_path):
    mid, labels = _tact_task(tmp_path)
    task = TaskActivations(
        {"attack_params": json.dumps({"source_classes": [0, 1]}), "attack": "tact", "model_id": mid},
        TargetOutput(torch.zeros(4, 3), torch.zeros(4, 8)),
        TargetOutput(torch.zeros(4, 3), torch.zeros(4, 8)),
        torch.tensor([0, 1, 2, 3]),
        torch.zeros(3, 8),
        None,
    )
    assert firing_rows(task, torch.tensor([0, 1, 2, 3])).tolist() == [True, True, False, False]

    from metashield_hf.meta.train import MetaTrainArguments, new_detector

    new_detector(MetaTrainArguments(out="x", cache_dir="x")).save_pretrained(tmp_path / "det")
    ev = Evaluation(tmp_path, [mid], [mid], {"metashield": str(tmp_path / "det")}, tmp_path / "out", seeds=1)
    ep = ev.episode(mid, 10, 0)
    assert len(ep.query_triggered) > 0 and set(labels[ep.query_triggered].tolist()) <= {0, 1}
    assert len(ep.query_psi) == len(ep.query_clean) + len(ep.query_triggered)
    rec = ev.record(ev.comparison_methods()[0], mid, 10, 0)
    assert 0.0 <= rec["auroc"] <= 1.0
