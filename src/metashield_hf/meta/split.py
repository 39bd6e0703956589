"""Splits by model: a model's inputs never appear in both meta-training and evaluation."""

from __future__ import annotations

import random


def split_models(
    metadata: list[dict],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    holdout_domain: str | None = None,
    holdout_attack: str | None = None,
) -> tuple[list[str], list[str]]:
    """(train ids, test ids).

    ``holdout_domain`` / ``holdout_attack``: every model of that domain / attack goes to the test side (leave one out);
    for a held-out attack the clean models are split at random as usual, so the test side has negatives. Otherwise a
    seeded split stratified by (domain, attack) puts ``test_fraction`` of each stratum in the test set.
    """
    rng = random.Random(seed)
    train, test = [], []
    strata: dict[tuple, list[str]] = {}
    for m in metadata:
        if holdout_domain is not None and m["domain"] == holdout_domain:
            test.append(m["model_id"])
        elif holdout_attack is not None and m["attack"] == holdout_attack:
            test.append(m["model_id"])
        elif holdout_domain is not None:
            train.append(m["model_id"])
        else:
            strata.setdefault((m["domain"], m["attack"]), []).append(m["model_id"])
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        n_test = round(test_fraction * len(ids)) if len(ids) > 1 else 0
        test += ids[:n_test]
        train += ids[n_test:]
    if not train or not test:
        raise ValueError(f"split gave {len(train)} training and {len(test)} test models; the zoo is too small")
    return sorted(train), sorted(test)
