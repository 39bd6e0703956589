"""Splits by model: a model's probe inputs never appear in both meta-training and evaluation."""

from __future__ import annotations

import random
from collections.abc import Sequence


def split_models(
    metadata: Sequence[dict],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    holdout_domain: str | None = None,
    holdout_attack: str | None = None,
) -> tuple[list[str], list[str]]:
    """Split zoo models into (train ids, test ids).

    Args:
        metadata: one dict per model with ``model_id``, ``domain`` and ``attack`` (``"none"`` for clean models).
        test_fraction: share of each (domain, attack) stratum that goes to the test side (random split only).
        seed: seeds the random split.
        holdout_domain: leave-one-domain-out: every model of this domain is tested, every other one trains.
        holdout_attack: leave-one-attack-out: every model of this attack is tested and no model of it trains; the
            other attacks all train, and the clean models are split by ``test_fraction`` per domain so that the test
            side has negatives.

    Returns:
        Sorted ``(train_ids, test_ids)``, disjoint.

    Example:
        ```python
        >>> train_ids, test_ids = split_models(metas, holdout_attack="blend")
        ```
    """
    if holdout_domain is not None and holdout_attack is not None:
        raise ValueError("give holdout_domain or holdout_attack, not both")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    for key, value in (("domain", holdout_domain), ("attack", holdout_attack)):
        present = sorted({m[key] for m in metadata})
        if value is not None and value not in present:
            raise ValueError(f"holdout_{key}={value!r} matches no model; the zoo has {key}s {present}")
    rng = random.Random(seed)
    train, test = [], []
    strata: dict[tuple[str, str], list[str]] = {}
    for m in metadata:
        if holdout_domain is not None:
            (test if m["domain"] == holdout_domain else train).append(m["model_id"])
        elif holdout_attack is not None and m["attack"] == holdout_attack:
            test.append(m["model_id"])
        elif holdout_attack is not None and m["attack"] != "none":
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
