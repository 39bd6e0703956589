"""Episodes: support/query disjoint and sized as asked; the deployable inner loop never sees a triggered input."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from metashield_hf.features import feature_names
from metashield_hf.meta.episodes import K_CHOICES, MIN_QUERY, make_episode, sample_episode
from metashield_hf.targets.base import TargetOutput

F = len(feature_names())


@pytest.mark.parametrize("k", K_CHOICES)
def test_support_and_query_are_disjoint_and_sized(synthetic_task, k):
    task = synthetic_task(n=80)
    ep = make_episode(task, k, seed=k, n_query=12)
    support = set(ep.support_index.tolist())
    assert len(support) == k and ep.support.shape == (k, F)
    assert not support & set(ep.query_clean_index.tolist())
    assert not support & set(ep.query_triggered_index.tolist())  # not even the triggered copy of a support input
    assert len(ep.query_clean_index) == len(ep.query_triggered_index) == 12
    assert ep.query.shape == (24, F) and ep.query_labels.tolist() == [0.0] * 12 + [1.0] * 12
    assert ep.inner_anomalies.shape == (max(k, 8), F)
    assert torch.isfinite(ep.support).all() and torch.isfinite(ep.query).all()


def test_support_size_is_capped_by_the_probe(synthetic_task):
    ep = make_episode(synthetic_task(n=20), 50, seed=0)
    assert len(ep.support_index) == 20 - MIN_QUERY
    assert len(ep.query_clean_index) == MIN_QUERY


def test_clean_model_query_is_all_negative(synthetic_task):
    ep = make_episode(synthetic_task(backdoored=False), 10, seed=0, n_query=8)
    assert ep.query_labels.sum() == 0 and len(ep.query_labels) == 16


def test_deployable_inner_loop_never_sees_triggered_inputs(synthetic_task):
    task = synthetic_task(n=60)
    noise = torch.randn_like(task.triggered.penultimate) * 50
    other = dataclasses.replace(
        task, triggered=TargetOutput(task.triggered.logits + 7, task.triggered.penultimate + noise)
    )
    a, b = make_episode(task, 10, seed=5), make_episode(other, 10, seed=5)
    # Whatever the triggered activations are, the support and the inner loop's positives do not change.
    assert torch.equal(a.support, b.support) and torch.equal(a.inner_anomalies, b.inner_anomalies)
    assert len(a.oracle_index) == 0
    # The oracle ablation does read them (so the check above would notice a leak).
    oa, ob = make_episode(task, 10, seed=5, inner_mode="oracle"), make_episode(other, 10, seed=5, inner_mode="oracle")
    assert not torch.equal(oa.inner_anomalies, ob.inner_anomalies)
    assert not set(oa.oracle_index.tolist()) & set(oa.query_triggered_index.tolist())
    assert not set(oa.oracle_index.tolist()) & set(oa.support_index.tolist())


def test_episodes_are_deterministic_under_the_seed(synthetic_task):
    tasks = [synthetic_task(seed=0), synthetic_task(seed=1)]
    a = sample_episode(tasks, random.Random(7), k_choices=(5, 10), n_query=6)
    b = sample_episode(tasks, random.Random(7), k_choices=(5, 10), n_query=6)
    assert a.model_id == b.model_id and torch.equal(a.query, b.query) and torch.equal(a.support_index, b.support_index)


def test_unknown_inner_mode_is_named(synthetic_task):
    with pytest.raises(ValueError, match="inner_mode must be one of"):
        make_episode(synthetic_task(), 5, seed=0, inner_mode="cheat")
