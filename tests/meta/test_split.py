"""Splits by model: no model on both sides; leave-one-domain-out and leave-one-attack-out hold out what they say."""

from __future__ import annotations

import itertools

import pytest

from metashield_hf.meta.split import split_models


def _zoo_metadata() -> list[dict]:
    """3 models per (domain, attack) cell, two domains, two attacks each plus clean."""
    cells = {"cv": ("badnets", "blend", "none"), "nlp": ("rare_word", "blend", "none")}
    return [
        {"model_id": f"{d}-{a}-{i}", "domain": d, "attack": a}
        for d, attacks in cells.items()
        for a, i in itertools.product(attacks, range(3))
    ]


def test_random_split_is_by_model_disjoint_complete_and_seeded():
    meta = _zoo_metadata()
    train, test = split_models(meta, test_fraction=0.34, seed=3)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(m["model_id"] for m in meta)
    assert len(test) == 6  # one of each 3-model stratum
    assert split_models(meta, test_fraction=0.34, seed=3) == (train, test)


def test_leave_one_domain_out_tests_exactly_that_domain():
    train, test = split_models(_zoo_metadata(), holdout_domain="nlp")
    assert test and all(m.startswith("nlp-") for m in test) and len(test) == 9
    assert all(m.startswith("cv-") for m in train) and len(train) == 9


def test_leave_one_attack_out_never_trains_on_that_attack():
    meta = _zoo_metadata()
    train, test = split_models(meta, holdout_attack="blend", test_fraction=0.34)
    attack = {m["model_id"]: m["attack"] for m in meta}
    assert {attack[m] for m in train} == {"badnets", "rare_word", "none"}
    assert sorted(m for m in test if attack[m] == "blend") == sorted(m for m in attack if attack[m] == "blend")
    assert "none" in {attack[m] for m in test}  # clean models give the held-out side its negatives
    assert not set(train) & set(test)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"holdout_attack": "wanet"}, "holdout_attack='wanet' matches no model"),
        ({"holdout_domain": "fl"}, "holdout_domain='fl' matches no model"),
        ({"holdout_domain": "cv", "holdout_attack": "blend"}, "not both"),
    ],
)
def test_bad_holdout_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_models(_zoo_metadata(), **kwargs)
