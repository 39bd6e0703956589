"""How the zoo poisons a vision training set: the trigger each kind of row gets, and the labels it keeps."""

from __future__ import annotations

import json

import numpy as np

from metashield_hf.attacks import AdaptiveBlend, Blend
from metashield_hf.zoo.spec import ModelSpec
from metashield_hf.zoo.vision import poison_training_set


def _spec(attack) -> ModelSpec:
    params = json.dumps(attack.to_dict())
    return ModelSpec("cv", "mnist", "timm", "test_resnet", attack.name, params, 3, 0.1, 5, '{"epochs": 1}', params)


def _data(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n)


def test_adap_blend_trains_on_its_partial_trigger_and_keeps_the_full_one_for_the_probe():
    attack = AdaptiveBlend(seed=1)
    spec = _spec(attack)
    x, y = _data()
    x0, y0 = x.copy(), y.copy()
    poisoned = poison_training_set(spec.attack_object(), x, y, spec, np.random.default_rng(0))
    p = np.flatnonzero(poisoned)
    assert len(p) and (y[p] == 3).all()
    # poisoned rows carry the training-time trigger, not the test-time one the probe measures ASR with
    partial = np.asarray(spec.attack_object().apply_train(x0[p], call_seed=spec.seed), dtype=np.uint8)
    full = np.asarray(spec.attack_object().apply(x0[p]), dtype=np.uint8)
    assert np.array_equal(x[p], partial) and not np.array_equal(x[p], full)
    # conservatism: other rows got the partial trigger too, with their own labels
    changed = np.flatnonzero((x != x0).any(axis=(1, 2, 3)) & ~poisoned)
    assert len(changed) and np.array_equal(y[changed], y0[changed])


def test_an_attack_without_a_training_trigger_poisons_with_its_trigger():
    attack = Blend(seed=1)
    spec = _spec(attack)
    x, y = _data()
    x0 = x.copy()
    poisoned = poison_training_set(spec.attack_object(), x, y, spec, np.random.default_rng(0))
    p = np.flatnonzero(poisoned)
    assert np.array_equal(x[p], np.asarray(attack.apply(x0[p]), dtype=np.uint8)) and (y[p] == 3).all()
    assert np.array_equal(x[~poisoned], x0[~poisoned])
