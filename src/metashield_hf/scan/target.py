"""Which class a scan suspects: a linear score over per-class evidence, the target the class it scores highest.

Each evidence source of the scan ranks the classes its own way: Neural Cleanse's anomaly index (a small mask that
sends clean samples there), the blend synthesis (a faint whole-image pattern that does), the input detector's response
to those inputs, the dormant mass (head weight on features clean inputs leave quiet) and the maximum achievable logit
margin. A transformation trigger leaves no small mask, so the anomaly index alone points at the wrong class there; a
weight edit leaves no dormant mass. A **target chooser** weighs the sources' per-class features, each relative to the
model's other classes (so that neither class order nor a model's scale matters), and names the class with the largest
weighted sum. Its weights are fit on zoo models whose target is known ([`fit_target_chooser`]) and chosen by how often
they name the target of an attack they were not fit on ([`leave_attack_out_target_accuracy`]).

The features are registered in [`CLASS_FEATURES`] by name; each reads the per-class arrays a scan keeps (the
``per_class`` fields of a scan record: ``anomaly_index``, ``blend_size``, ``detector_score``, ``dormant_mass``,
``max_margin``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .synthesis import anomaly_indices

__all__ = [
    "CLASS_FEATURES",
    "TargetChoice",
    "choose_target",
    "choose_target_chooser",
    "class_feature",
    "class_features",
    "fit_target_chooser",
    "leave_attack_out_target_accuracy",
]

#: Per-class features by name: each maps a scan's per-class arrays to a ``(K,)`` array, larger = more target-like.
CLASS_FEATURES: dict[str, Callable[[Mapping[str, np.ndarray]], np.ndarray]] = {}
#: Floor of a per-class maximum margin before its log (a margin can be negative where no input reaches the class).
MARGIN_FLOOR = 0.01
#: A feature's value is clipped to ``[-CLIP, CLIP]`` so that one degenerate class (a zero MAD) cannot dominate.
CLIP = 20.0


def class_feature(name: str) -> Callable:
    """Register a per-class feature in [`CLASS_FEATURES`] under ``name``."""

    def register(fn: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> Callable:
        if name in CLASS_FEATURES:
            raise ValueError(f"class feature {name!r} is already registered")
        CLASS_FEATURES[name] = fn
        return fn

    return register


def _array(per_class: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if per_class.get(key) is None:
        raise ValueError(
            f"the per-class evidence has no {key!r}; it has {sorted(k for k, v in per_class.items() if v is not None)}"
        )
    return np.asarray(per_class[key], dtype=np.float64).ravel()


@class_feature("anomaly_index")
def _anomaly_index(per_class: Mapping[str, np.ndarray]) -> np.ndarray:
    """Neural Cleanse's anomaly index (robust z of the mask sizes; larger = smaller mask)."""
    return _array(per_class, "anomaly_index")


@class_feature("blend_z")
def _blend_z(per_class: Mapping[str, np.ndarray]) -> np.ndarray:
    """The anomaly index ([`anomaly_indices`]: robust z over classes, smaller = larger) of the log blend size (larger
    = a fainter whole-image pattern flips to it)."""
    return anomaly_indices(np.log(np.maximum(_array(per_class, "blend_size"), 1e-12)))


@class_feature("detector_excess")
def _detector_excess(per_class: Mapping[str, np.ndarray]) -> np.ndarray:
    """The input detector's score of the class's synthesized inputs less its median over classes."""
    score = _array(per_class, "detector_score")
    return score - np.median(score)


@class_feature("dormant_log_ratio")
def _dormant_log_ratio(per_class: Mapping[str, np.ndarray]) -> np.ndarray:
    """Log dormant mass less its median over classes."""
    log = np.log(np.maximum(_array(per_class, "dormant_mass"), 1e-12))
    return log - np.median(log)


@class_feature("max_margin_log_ratio")
def _max_margin_log_ratio(per_class: Mapping[str, np.ndarray]) -> np.ndarray:
    """Log maximum achievable margin (floored at [`MARGIN_FLOOR`]) less its median over classes."""
    log = np.log(np.maximum(_array(per_class, "max_margin"), MARGIN_FLOOR))
    return log - np.median(log)


def class_features(per_class: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The ``(K, len(names))`` matrix of the named [`CLASS_FEATURES`] of one scan's per-class arrays.

    Raises:
        ValueError: an unknown feature name, a per-class array the feature needs is missing, or the arrays
            disagree on the number of classes.
    """
    unknown = [n for n in names if n not in CLASS_FEATURES]
    if unknown:
        raise ValueError(f"unknown class features {unknown}; known: {sorted(CLASS_FEATURES)}")
    columns = [CLASS_FEATURES[n](per_class) for n in names]
    if len({len(c) for c in columns}) > 1:
        raise ValueError(f"per-class arrays of different lengths: {[len(c) for c in columns]}")
    x = np.stack(columns, axis=1) if columns else np.zeros((0, 0))
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=CLIP, neginf=-CLIP), -CLIP, CLIP)


def choose_target(weights: Mapping[str, float], per_class: Mapping[str, np.ndarray]) -> int:
    """The class with the largest ``Σ weights[f] * feature_f(class)`` (ties: the lower class index)."""
    names = list(weights)
    if not names:
        raise ValueError("a target chooser needs at least one weighted feature")
    score = class_features(per_class, names) @ np.array([weights[n] for n in names], dtype=np.float64)
    return int(np.argmax(score))


def fit_target_chooser(
    per_class: Sequence[Mapping[str, np.ndarray]], targets: Sequence[int], names: Sequence[str], c: float = 1.0
) -> dict[str, float]:
    """Weights of a target chooser fit on backdoored models with known targets.

    Every class of every model is one row (1 for the model's target class, 0 for its other classes) of an
    L2-regularised logistic regression on the standardised ``names`` features; the weights are mapped back to raw
    feature units (the intercept does not change which class is largest, so it is dropped). With one feature the
    chooser needs no fit: its weight is 1.

    Args:
        per_class: each backdoored model's per-class arrays.
        targets: each model's target class.
        names: the [`CLASS_FEATURES`] to weigh.
        c: inverse L2 strength.
    """
    if len(per_class) != len(targets) or not len(targets):
        raise ValueError(f"need one target per model and at least one model, got {len(per_class)} and {len(targets)}")
    if len(names) == 1:
        return {names[0]: 1.0}
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for pc, t in zip(per_class, targets, strict=True):
        x = class_features(pc, names)
        if not 0 <= int(t) < len(x):
            raise ValueError(f"target {t} outside the model's {len(x)} classes")
        y = np.zeros(len(x))
        y[int(t)] = 1.0
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    mean, sd = x.mean(0), x.std(0)
    sd[sd < 1e-12] = 1.0
    clf = LogisticRegression(C=c, max_iter=2000).fit((x - mean) / sd, y)
    return {n: float(w) for n, w in zip(names, clf.coef_[0] / sd, strict=True)}


def leave_attack_out_target_accuracy(
    per_class: Sequence[Mapping[str, np.ndarray]],
    targets: Sequence[int],
    attacks: Sequence[str],
    names: Sequence[str],
    c: float = 1.0,
) -> dict[str, float]:
    """For every attack, the share of its models whose target a chooser on ``names`` fit on the other attacks'
    models names ([`fit_target_chooser`]): how well the chooser carries over to an attack it never saw."""
    attacks = np.asarray([str(a) for a in attacks])
    out = {}
    for attack in sorted(set(attacks)):
        held, fit = np.flatnonzero(attacks == attack), np.flatnonzero(attacks != attack)
        if not len(fit):
            continue
        weights = fit_target_chooser([per_class[i] for i in fit], [targets[i] for i in fit], names, c)
        out[attack] = float(np.mean([choose_target(weights, per_class[i]) == int(targets[i]) for i in held]))
    return out


@dataclass
class TargetChoice:
    """What [`choose_target_chooser`] chose, and how.

    Attributes:
        weights: the chosen chooser's weights, fit on every model; ``None`` where no candidate beat the baseline
            by ``min_gain`` (the scan keeps the anomaly index's pointer).
        names / c: the chosen candidate.
        scores: every candidate's mean over attacks of [`leave_attack_out_target_accuracy`], by ``(names, c)``.
        per_attack: every candidate's accuracy per held-out attack.
        baseline: the baseline candidate's score.
    """

    weights: dict[str, float] | None
    names: tuple[str, ...]
    c: float
    scores: dict[tuple[tuple[str, ...], float], float]
    per_attack: dict[tuple[tuple[str, ...], float], dict[str, float]]
    baseline: float


def choose_target_chooser(
    per_class: Sequence[Mapping[str, np.ndarray]],
    targets: Sequence[int],
    attacks: Sequence[str],
    candidates: Sequence[Sequence[str]],
    cs: Sequence[float] = (0.1, 1.0),
    *,
    baseline: Sequence[str] = ("anomaly_index",),
    min_gain: float = 0.0,
) -> TargetChoice:
    """Choose a target chooser among ``candidates x cs`` (a one-feature candidate needs no C and is scored once) by
    the mean over attacks of [`leave_attack_out_target_accuracy`] on backdoored models; ties go to the earlier
    candidate and the smaller C. The best is fit on every model and returned if it beats ``baseline`` (a candidate
    too) by at least ``min_gain``; otherwise ``weights`` is ``None``."""
    keys = []
    for names in dict.fromkeys(tuple(n) for n in (tuple(baseline), *candidates)):
        keys += [(names, 1.0)] if len(names) == 1 else [(names, float(c)) for c in cs]
    per_attack = {k: leave_attack_out_target_accuracy(per_class, targets, attacks, *k) for k in keys}
    scores = {k: float(np.mean(list(v.values()))) for k, v in per_attack.items()}
    (names, c), best = max(scores.items(), key=lambda kv: kv[1])  # max keeps the first of equal values
    base = scores[(tuple(baseline), 1.0)]
    weights = None
    if names != tuple(baseline) and best - base >= min_gain:
        weights = fit_target_chooser(per_class, targets, names, c)
    return TargetChoice(weights, names, c, scores, per_attack, base)
