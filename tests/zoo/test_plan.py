"""plan(): deterministic, clean models drawn like poisoned ones, stable ids; config validation; the ASR definition."""

from __future__ import annotations

import dataclasses
import json

import pytest

from metashield_hf.zoo import ModelSpec, ZooConfig, attack_success_rate, plan
from metashield_hf.zoo.spec import family_of, poison_indices


def test_plan_is_deterministic_and_seeded(tiny_config):
    a, b = plan(tiny_config), plan(tiny_config)
    assert a == b
    other = plan(dataclasses.replace(tiny_config, seed=tiny_config.seed + 1))
    assert [s.model_id for s in other] != [s.model_id for s in a]
    assert len({s.model_id for s in a}) == len(a)


def test_model_id_is_stable():
    spec = ModelSpec("cv", "digits", "timm", "test_resnet", "none", "{}", -1, 0.0, 3, '{"epochs": 2}')
    # A known answer: ids are keys in published zoos, so the hash of the fields must never change silently.
    assert spec.model_id == "cv-digits-test_resnet-none-94e57a7c"
    assert ModelSpec.from_dict(spec.to_dict()).model_id == spec.model_id
    assert dataclasses.replace(spec, seed=4).model_id != spec.model_id


def test_clean_models_are_drawn_like_poisoned(tiny_config):
    specs = plan(tiny_config)
    clean = [s for s in specs if s.attack == "none"]
    # tiny: per cell and architecture, one poisoned model per attack and one clean model
    # (cv: 2 archs x (2 + 1), nlp: 2 x (1 + 1), fl: 1 x (1 + 1))
    assert len(clean) == 5 and len(specs) == 12
    assert {s.domain for s in specs} == {"cv", "nlp", "fl"}
    assert {s.architecture for s in specs if s.domain == "fl"} == {"cnn_fedavg"}
    for s in specs:
        recipe_of_kind = {t.recipe for t in specs if (t.dataset, t.architecture) == (s.dataset, s.architecture)}
        assert len(recipe_of_kind) == 1, "clean and poisoned models of a kind must share the recipe"
        if s.is_backdoored:
            assert 0 <= s.target_label < s.num_classes
            cell = next(c for c in tiny_config.cells if (c["domain"], c["dataset"]) == (s.domain, s.dataset))
            lo, hi = cell.get("poison_rate_range", tiny_config.poison_rate_range)
            assert lo <= s.poison_rate <= hi
            assert s.probe_attack_params == s.attack_params
            assert s.attack_object().to_dict() == json.loads(s.attack_params)
        else:
            assert (s.target_label, s.poison_rate, s.attack_params) == (-1, 0.0, "{}")
            assert s.attack_object() is None
            cell_attacks = {t.attack for t in specs if t.dataset == s.dataset and t.is_backdoored}
            assert s.probe_attack_object().name in cell_attacks  # a negative control from the same cell


def test_plan_draws_listed_params_and_respects_fixed_ones(tiny_config):
    badnets = [json.loads(s.attack_params) for s in plan(tiny_config) if s.attack == "badnets"]
    assert all(p["patch_size"] == 3 and p["pattern"] in ("checkerboard", "white") for p in badnets)


def test_cells_are_drawn_independently_of_their_order(tiny_config):
    reordered = dataclasses.replace(tiny_config, cells=list(reversed(tiny_config.cells)))
    assert {s.model_id for s in plan(reordered)} == {s.model_id for s in plan(tiny_config)}


def test_config_errors_name_the_problem(tiny_config):
    cell = dict(tiny_config.cells[0])
    with pytest.raises(ValueError, match="domain 'audio'"):
        ZooConfig(name="x", cells=[{**cell, "domain": "audio"}])
    with pytest.raises(ValueError, match="lacks \\['recipe'\\]"):
        ZooConfig(name="x", cells=[{k: v for k, v in cell.items() if k != "recipe"}])
    with pytest.raises(ValueError, match="unknown zoo config keys \\['bogus'\\]"):
        ZooConfig.from_dict({"name": "x", "bogus": 1})
    with pytest.raises(ValueError, match="poison_rate_range"):
        ZooConfig(name="x", poison_rate_range=(0.2, 0.1))
    with pytest.raises(ValueError, match="'rare_word' is a 'nlp' attack"):
        plan(ZooConfig(name="x", cells=[{**cell, "attacks": ["rare_word"]}]))
    with pytest.raises(ValueError, match="unknown architecture 'mlp9'"):
        family_of("mlp9")


def test_attack_success_rate_known_answers():
    # target 1: rows of class 1 do not count; 2 of the 3 others are classified 1
    assert attack_success_rate([1, 1, 0, 1], [0, 2, 0, 1], target_label=1) == pytest.approx(2 / 3)
    # clean model (-1): the best class an attacker could claim. class 2 gets 3 of the 3 rows not of class 2
    assert attack_success_rate([2, 2, 2, 0], [0, 1, 0, 2], target_label=-1) == pytest.approx(1.0)
    assert attack_success_rate([0, 1], [0, 1], target_label=-1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same shape"):
        attack_success_rate([0], [0, 1], 0)


def test_poison_indices_avoid_the_target():
    import numpy as np

    labels = np.array([0, 1, 1, 2, 1, 0, 2, 2, 1, 0])
    idx = poison_indices(labels, 0.3, target=1, rng=np.random.default_rng(0))
    assert len(idx) == 3 and (labels[idx] != 1).all()
    with pytest.raises(ValueError, match="needs 7 non-target rows but only 6"):
        poison_indices(labels, 0.7, target=1, rng=np.random.default_rng(0))
