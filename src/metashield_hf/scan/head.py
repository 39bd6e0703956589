"""The model-level head of the scan: a tiny logistic model over the scan signals, and how it is fit.

[`ScanHead`] turns one scan's signals into a backdoor probability. The rest of this module fits heads on *scan
records* of zoo models with known labels: JSON-able dicts, one per scanned model (see [`scan_record`]), with the
zoo row's ``model_id``, ``domain``, ``dataset``, ``is_backdoored``, ``num_classes``, ``modality`` and the scan's
result under ``"metashield"``. The fitting is cross-validated on train models only, and the verdict thresholds are
tied to a false-positive rate on them, so that held-out models play no part in any choice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .signals import (
    AGNOSTIC,
    BLEND,
    LARGE_VOCABULARY,
    SIGNALS,
    SOURCE,
    SYNTHESIS_SIGNALS,
    class_count_signals,
    log_odds,
    scan_variant,
    token_detector_signal,
    token_signals,
)
from .synthesis import MAD_CONSISTENCY

#: The part a variant's scan falls back to where the head has none for it (or lacks its signals): a source-specific
#: scan and a scan with the trigger-agnostic evidence also ran the blend synthesis (scan_model's default), so each is
#: scored as a blend scan, then as a plain one.
VARIANT_FALLBACK = {SOURCE: BLEND, AGNOSTIC: BLEND}
DEFAULT_SCAN_HEAD = Path(__file__).parents[1] / "default_detector" / "scan_head.json"


# ---- the model-level head ---------------------------------------------------------------------------------------
@dataclass
class ScanHead:
    """A tiny logistic model over the scan signals: ``score = sigmoid(bias + Σ weights[s] * signals[s])``.

    The shipped default (``default_detector/scan_head.json``) is fit by [`fit_heads`] and [`choose_part`] on scans
    of zoo train models (``benchmarks/scan/fit_head.py`` rebuilds it from the committed records).

    Attributes:
        weights: one weight per name in [`SIGNALS`] (missing names weigh 0).
        bias: the intercept.
        threshold: score above which the verdict is ``"backdoored"``.
        source: where the weights come from (``"prior"`` or a description of the fit).
        alarms: per signal, ``[t, s]``: the evidence union ([`set_alarms`]). The score is the larger of the logistic
            score and, for each alarm, ``sigmoid(logit(threshold) + (signal - t) / s)``, so an alarm crosses the
            verdict threshold exactly when its signal crosses ``t``, whatever the other signals say.
        by_modality: heads for one target modality (``"text"``, ``"image"``, ``"tensor"``), or for a variant of
            one (``"text/large_vocabulary"``), as dicts of these same fields; a scan of such a model uses that head
            instead (text scans have the token signals, whose meaning differs from the image signals; and a search
            that prefilters a pretrained model's large vocabulary finds natural words as strong as a trigger, so its
            probability signals mean less there than the detector's).
        target: the target chooser's weights per class feature ([`choose_target`]): the suspected target is the
            class they score highest. ``None``: the class with the largest anomaly index (the synthesis' pointer).
    """

    weights: dict[str, float]
    bias: float
    threshold: float = 0.5
    source: str = "prior"
    by_modality: dict[str, dict] | None = None
    alarms: dict[str, list[float]] | None = None
    target: dict[str, float] | None = None

    def for_modality(
        self, modality: str, signals: dict[str, float] | None = None, variant: str | None = None
    ) -> ScanHead:
        """The head to use for a target of ``modality``: the part for ``modality/variant`` where there is one, else
        that of the variant it falls back to ([`VARIANT_FALLBACK`]), else the part for ``modality``, else this head;
        given the scan's ``signals``, only a part whose every weighed signal is among them (e.g. not the text part
        for a text scan run without the token search)."""
        key = self.part_key(modality, signals, variant)
        return self if key is None else ScanHead(**self.by_modality[key])

    def part_key(
        self, modality: str, signals: dict[str, float] | None = None, variant: str | None = None
    ) -> str | None:
        """The ``by_modality`` key of the part [`for_modality`] returns; ``None`` for this head itself."""
        keys = []
        while variant:
            keys.append(f"{modality}/{variant}")
            variant = VARIANT_FALLBACK.get(variant)
        keys.append(modality)
        for key in keys:
            sub = (self.by_modality or {}).get(key)
            if sub is not None and (signals is None or not ScanHead(**sub).missing(signals)):
                return key
        return None

    def missing(self, signals) -> list[str]:
        """The signals this head weighs that are not among ``signals`` (a dict or any collection of names)."""
        needed = [n for n, w in self.weights.items() if w] + list(self.alarms or {})
        return sorted({n for n in needed if n not in signals})

    def logit(self, signals: dict[str, float]) -> float:
        unknown = sorted((set(self.weights) | set(self.alarms or {})) - set(SIGNALS))
        if unknown:
            raise ValueError(f"scan head has weights for unknown signals {unknown}; known: {list(SIGNALS)}")
        missing = self.missing(signals)
        if missing:
            raise ValueError(f"the scan head needs signals {missing}, which this scan did not produce")
        return self.bias + sum(w * float(signals[name]) for name, w in self.weights.items() if w)

    def score(self, signals: dict[str, float]) -> float:
        """The backdoor probability in ``[0, 1]`` for one model's signals (with alarms, the largest of the logistic
        score and the alarms' scores)."""
        p = _sigmoid(self.logit(signals))
        if self.alarms:
            anchor = log_odds(self.threshold)
            for name, (t, scale) in self.alarms.items():
                p = max(p, _sigmoid(anchor + (float(signals[name]) - t) / scale))
        return p

    def save(self, path: str | os.PathLike) -> None:
        data = asdict(self)
        for part in [data, *(data.get("by_modality") or {}).values()]:
            for key in ("alarms", "target"):  # a head without them saves as before they existed
                if part.get(key) is None:
                    part.pop(key, None)
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> ScanHead:
        """Read a head saved with [`save`] (the shipped default when ``path`` is None)."""
        path = DEFAULT_SCAN_HEAD if path is None else Path(path)
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"cannot read a scan head from {path}: {err}") from err


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


#: Neural Cleanse's rule as a head (anomaly index > 2 => score > 0.5): the FL screen's head, since the fitted head is
#: fit on full-budget scans of whole zoo models and its short per-candidate scans give sizes that head does not expect.
NEURAL_CLEANSE_RULE_HEAD = ScanHead(
    {"anomaly_index": 2.0, "log_size_ratio": 0.0, "detector_response": 0.0, "detector_response_gap": 0.0},
    -4.0,
    0.5,
    "prior: Neural Cleanse rule (anomaly index > 2 => backdoored)",
)


def _signal_matrix(reports: Sequence, names: Sequence[str]) -> np.ndarray:
    rows = []
    for r in reports:
        r = getattr(r, "signals", r)  # a ScanReport
        if isinstance(r, dict):
            missing = [n for n in names if n not in r]
            if missing:
                raise ValueError(f"signals {missing} missing from a report; it has {sorted(r)}")
            rows.append([float(r[n]) for n in names])
        else:
            rows.append([float(v) for v in np.asarray(r, dtype=np.float64).ravel()])
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"signal vectors must have {len(names)} values ({list(names)}), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("signal vectors contain NaN/inf; rerun the scans that produced them")
    return x


def fit_scan_head(
    reports: Sequence, labels: Sequence[int], *, c: float = 1.0, signals: Sequence[str] = SYNTHESIS_SIGNALS
) -> ScanHead:
    """Fit the model-level head on scans of zoo models with known labels (1 = backdoored, 0 = clean).

    Signals are standardized for the fit (L2-regularized logistic regression, scikit-learn) and the weights mapped
    back to raw signal units, so the saved head is a plain logistic model on the report's ``signals``.

    Args:
        reports: [`ScanReport`]s, ``signals`` dicts, or vectors in the order of ``signals``.
        labels: 1 for backdoored models, 0 for clean ones (both must occur).
        c: inverse regularization strength.
        signals: the signal names used as features.

    Returns:
        A [`ScanHead`] (threshold 0.5).

    Example:
        ```python
        >>> head = fit_scan_head([scan_model(m, clean) for m in zoo_models], zoo_labels)
        >>> head.save("scan_head.json")
        ```
    """
    from sklearn.linear_model import LogisticRegression

    x = _signal_matrix(reports, signals)
    y = np.asarray(labels, dtype=int).ravel()
    if len(y) != len(x):
        raise ValueError(f"{len(x)} reports but {len(y)} labels")
    if set(np.unique(y)) != {0, 1}:
        raise ValueError(f"labels must contain both 0 (clean) and 1 (backdoored), got {sorted(set(y.tolist()))}")
    mean, sd = x.mean(0), x.std(0)
    sd[sd < 1e-12] = 1.0  # a constant signal carries no information; keep its weight at 0
    clf = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / sd, y)
    w = clf.coef_[0] / sd
    b = float(clf.intercept_[0] - (clf.coef_[0] * mean / sd).sum())
    return ScanHead(
        {n: float(v) for n, v in zip(signals, w, strict=True)}, b, 0.5, f"fit on {len(y)} models ({int(y.sum())} bd)"
    )


# ---- scan records ------------------------------------------------------------------------------------------------
def scan_record(report, **row: object) -> dict:
    """The record of one scanned zoo model: the zoo row's columns in ``row`` (``model_id``, ``domain``, ``dataset``,
    ``architecture``, ``attack``, ``target_label``, ``is_backdoored``, ...) and the [`ScanReport`]'s signals, scores,
    timings and per-class evidence under ``"metashield"`` (so that other model-level signals can be studied on the
    records without a rescan)."""
    per_class = report.per_class
    options = report.options
    rec = {
        **row,
        "num_classes": len(per_class),
        "modality": "text" if report.space in ("embeddings", "tokens") else "image",
        "metashield": {
            "signals": report.signals,
            "score_default": report.score,
            "suspected_target": report.suspected_target,
            "seconds": report.timings["total_s"],
            "timings": report.timings,
            "space": report.space,
            "large_vocabulary": options["large_vocabulary"],
            "steps": options["steps"],
            "refine": options["refine"],
            "screen_steps": options["screen_steps"],
            "blend_steps": options["blend_steps"],
            "source_steps": options["source_steps"],
            "max_margin_steps": options.get("max_margin_steps", 0),
            "feature_steps": options.get("feature_steps", 0),
            "dormancy": bool(options.get("dormancy", False)),
            "per_class": {
                "trigger_size": [c.trigger_size for c in per_class],
                "flip_rate": [c.flip_rate for c in per_class],
                "anomaly_index": [c.anomaly_index for c in per_class],
                "detector_score": [c.detector_score for c in per_class],
                **({"blend_size": [c.blend_size for c in per_class]} if options["blend_steps"] else {}),
                **({"source_size": [c.source_size for c in per_class]} if options["source_steps"] else {}),
                **({"max_margin": [c.max_margin for c in per_class]} if options.get("max_margin_steps") else {}),
                **({"feature_size": [c.feature_size for c in per_class]} if options.get("feature_steps") else {}),
                **({"dormant_mass": [c.dormant_mass for c in per_class]} if options.get("dormancy") else {}),
            },
        },
    }
    if options.get("token_search"):
        rec["metashield"]["tokens"] = [
            {
                "trigger": c.token_trigger,
                "flip_rates": c.token_flip_rates,
                "target_probs": c.token_target_probs,
                "low_probs": c.token_low_probs,
                "dominance": c.token_dominance,
            }
            for c in per_class
        ]
    return rec


def record_modality(rec: dict) -> str:
    """``"text"`` or ``"image"``: which head part family scores a record."""
    return rec.get("modality", "text" if rec["domain"] == "nlp" else "image")


def record_variant(rec: dict) -> str | None:
    """The scan's head variant: ``LARGE_VOCABULARY`` for a text scan whose token search prefiltered the vocabulary,
    ``SOURCE`` for an image scan with the source-specific synthesis, ``AGNOSTIC`` for one with the blend synthesis and
    the maximum-margin statistic, ``BLEND`` for one with the blend synthesis only."""
    if rec["metashield"].get("large_vocabulary"):
        return LARGE_VOCABULARY
    ms = rec["metashield"]
    if ms.get("source_steps"):
        return SOURCE
    return scan_variant(BLEND, ms["signals"]) if ms.get("blend_steps") else None


def refresh_record(rec: dict) -> dict:
    """Recompute a record's token signals, suspected target and class-count-corrected synthesis signals from its
    stored per-class evidence with this library's functions, so that a head fit on old records reads the signals the
    current scan computes (in place; returns ``rec``)."""
    ms = rec["metashield"]
    tokens = ms.get("tokens")
    if tokens:
        keys = ("flip_rates", "target_probs", "low_probs", "dominance")
        arrays = SimpleNamespace(**{key: np.array([c[key] for c in tokens]) for key in keys})
        target, signals = token_signals(arrays)
        scores = ms["per_class"]["detector_score"]
        if "anomaly_index" not in ms["signals"] and None not in scores:  # the scores of the token triggers
            target, detected = token_detector_signal(scores, arrays.flip_rates[:, -1])
            signals |= detected
        ms["signals"].update(signals)
        ms["suspected_target"] = target
    signals = ms["signals"]
    if "anomaly_index" in signals:  # not a text scan by the token search alone
        signals.update(class_count_signals(signals["anomaly_index"], signals["log_size_ratio"], rec["num_classes"]))
    return rec


def score_record(head: ScanHead, rec: dict) -> float:
    """The head's score of a record; NaN where the record lacks a signal the head weighs."""
    signals = rec["metashield"]["signals"]
    part = head.for_modality(record_modality(rec), signals, record_variant(rec))
    if part.missing(signals):
        return float("nan")
    return part.score(signals)


def record_target(head: ScanHead, rec: dict) -> int:
    """The suspected target the head's part that scores a record names: its target chooser's pick from the record's
    per-class evidence ([`choose_target`]) where the part has one; else, for a scan with the mask synthesis, the class
    with the largest anomaly index (the scan's pointer without a chooser), whatever head scanned it; else the record's
    own suspected target (a token search's)."""
    from .target import choose_target

    res = rec["metashield"]
    part = head.for_modality(record_modality(rec), res["signals"], record_variant(rec))
    if part.target is not None:
        return choose_target(part.target, res["per_class"])
    anomaly = (res.get("per_class") or {}).get("anomaly_index")
    if anomaly is not None and None not in anomaly:
        return int(np.argmax(anomaly))
    return int(res["suspected_target"])


def verdict_threshold(head: ScanHead, rec: dict) -> float:
    """The threshold of the head's part that scores a record: what ``scan_model``'s verdict compares the score with."""
    signals = rec["metashield"]["signals"]
    return head.for_modality(record_modality(rec), signals, record_variant(rec)).threshold


def _labels(rows: Sequence[dict]) -> np.ndarray:
    return np.array([int(r["is_backdoored"]) for r in rows])


# ---- fitting the head on records ------------------------------------------------------------------------------------
def fit_heads(
    train: Sequence[dict],
    c: float,
    text_signals: Sequence[str],
    text_c: float | None = None,
    large_signals: Sequence[str] = (),
) -> ScanHead:
    """A head for image/tensor scans on the [`SYNTHESIS_SIGNALS`], with a text part (``by_modality["text"]``) on
    ``text_signals``: the token signals exist only for text, and mean different things there. With ``large_signals``
    (and train text models of both kinds), the text scans whose search prefiltered a large vocabulary get their own
    part (``"text/large_vocabulary"``) and the text part is fit on the others.

    Args:
        train: scan records of train models (both labels in each group).
        c / text_c: inverse L2 strength of the image head and of the text parts (``text_c=None``: ``c``).
        text_signals / large_signals: the signals of the text and large-vocabulary parts.
    """
    other = [r for r in train if record_modality(r) != "text"]
    text = [r for r in train if record_modality(r) == "text"]
    head = fit_scan_head([r["metashield"]["signals"] for r in other], _labels(other), c=c)
    large = [r for r in text if record_variant(r) == LARGE_VOCABULARY] if large_signals else []
    small = [r for r in text if record_variant(r) != LARGE_VOCABULARY]
    if len({int(r["is_backdoored"]) for r in large}) < 2 or len({int(r["is_backdoored"]) for r in small}) < 2:
        large, small = [], text  # too few of a kind to fit a part apart
    parts = {}
    for key, rows, names in (("text", small, text_signals), (f"text/{LARGE_VOCABULARY}", large, large_signals)):
        if rows and names:
            sub = fit_scan_head(
                [r["metashield"]["signals"] for r in rows],
                _labels(rows),
                c=c if text_c is None else text_c,
                signals=tuple(names),
            )
            parts[key] = {k: v for k, v in sub.__dict__.items() if k != "by_modality"}
    head.by_modality = parts or None
    return head


def _strata(train: Sequence[dict]) -> list[str]:
    """Cross-validation strata of the train records: domain, label and whether the vocabulary was large."""
    return [f"{r['domain']}{int(r['is_backdoored'])}{record_variant(r) == LARGE_VOCABULARY}" for r in train]


def out_of_fold_scores(
    train: Sequence[dict],
    c: float,
    text_signals: Sequence[str],
    text_c: float | None = None,
    large_signals: Sequence[str] = (),
    repeats: int = 20,
    folds: int = 5,
) -> list[np.ndarray]:
    """Per repeat of a stratified k-fold split (strata: domain, label, vocabulary size), every train record's score
    by the heads ([`fit_heads`]) fit on the other folds."""

    def fit_and_score(fit: np.ndarray, held: np.ndarray) -> list[float]:
        head = fit_heads([train[i] for i in fit], c, text_signals, text_c, large_signals)
        return [score_record(head, train[i]) for i in held]

    return repeated_cv(_strata(train), fit_and_score, repeats, folds)


def repeated_cv(strata: Sequence[str], fit_and_score, repeats: int = 20, folds: int = 5) -> list[np.ndarray]:
    """Per repeat ``r`` of a stratified ``folds``-fold split (shuffled with seed ``r``), every row's out-of-fold score:
    ``fit_and_score(fit_rows, held_rows)`` fits on the ``fit_rows`` indices and scores the ``held_rows``."""
    from sklearn.model_selection import StratifiedKFold

    out = []
    for rep in range(repeats):
        scores = np.zeros(len(strata))
        for fit, held in StratifiedKFold(folds, shuffle=True, random_state=rep).split(np.zeros(len(strata)), strata):
            scores[held] = fit_and_score(fit, held)
        out.append(scores)
    return out


def cv_head_c(
    train: Sequence[dict],
    text_signals: Sequence[str],
    cs: Sequence[float] = (0.1, 1.0, 10.0),
    repeats: int = 20,
    folds: int = 5,
    text_c: float | None = None,
    large_signals: Sequence[str] = (),
) -> dict[float, dict[str, float]]:
    """Per C, the mean out-of-fold AUROC per domain of [`fit_heads`] over the train records
    ([`out_of_fold_scores`]); for text also ``nlp (large vocabulary)`` and ``nlp (small vocabulary)`` where the train
    records have both. ``text_c`` fixes the text parts' C (default: the same C)."""
    from ..evaluation.metrics import auroc

    y = _labels(train)
    groups = {d: np.array([r["domain"] == d for r in train]) for d in sorted({r["domain"] for r in train})}
    large = np.array([record_variant(r) == LARGE_VOCABULARY for r in train])
    nlp = groups.get("nlp", np.zeros(len(train), dtype=bool))
    if (nlp & large).any() and (nlp & ~large).any():
        groups["nlp (large vocabulary)"] = nlp & large
        groups["nlp (small vocabulary)"] = nlp & ~large
    out = {}
    for c in cs:
        runs = out_of_fold_scores(train, c, text_signals, text_c, large_signals, repeats, folds)
        out[c] = {g: float(np.mean([auroc(scores[m], y[m]) for scores in runs])) for g, m in groups.items()}
    return out


def fpr_threshold(runs: Sequence[np.ndarray], clean: np.ndarray, fpr: float) -> float:
    """The score that flags a share ``fpr`` of the ``clean`` rows: the ``1 - fpr`` quantile of their out-of-fold
    scores pooled over the repeats ``runs``."""
    return float(np.quantile(np.concatenate([scores[clean] for scores in runs]), 1.0 - fpr))


def set_fpr_thresholds(
    head: ScanHead, train: Sequence[dict], runs: Sequence[np.ndarray], fpr: float
) -> dict[str, float]:
    """Set the verdict threshold of the head and of each of its parts to the score that flags a share ``fpr`` of the
    clean train records it scores, by their out-of-fold scores ``runs`` ([`out_of_fold_scores`]); returns them by
    part (``"image"`` for the head itself).

    A logistic fit puts 0.5 where the train set's mix of clean and backdoored models does, which is not the mix a user
    meets; a threshold tied to a false-positive rate means the same for every part (as the input-level pipeline's
    ``target_fpr`` does)."""
    keys = [head.part_key(record_modality(r), r["metashield"]["signals"], record_variant(r)) for r in train]
    clean = np.array([not r["is_backdoored"] for r in train])
    out = {}
    for key in dict.fromkeys(keys):
        rows = np.array([k == key for k in keys]) & clean
        if not rows.any():
            continue
        value = fpr_threshold(runs, rows, fpr)
        if key is None:
            head.threshold = value
        else:
            head.by_modality[key]["threshold"] = value
        out[key or "image"] = value
    return out


# ---- the variant parts ---------------------------------------------------------------------------------------------
#: A candidate's signal named ``alarm:<signal>`` is an alarm of the part ([`set_alarms`]), not a logistic input.
ALARM_PREFIX = "alarm:"


def split_candidate(candidate: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A candidate's logistic signals and its alarm signals (``alarm:<signal>`` names, prefix removed)."""
    logistic = tuple(n for n in candidate if not n.startswith(ALARM_PREFIX))
    alarms = tuple(n[len(ALARM_PREFIX) :] for n in candidate if n.startswith(ALARM_PREFIX))
    return logistic, alarms


def set_alarms(
    part: ScanHead,
    clean_signals: Sequence[dict],
    alarms: Sequence[str],
    fpr: float,
    logistic_clean_scores: Sequence[float] | None = None,
) -> ScanHead:
    """Give ``part`` the evidence union: an alarm per signal of ``alarms``, whose threshold ``t`` flags a share
    ``fpr / (len(alarms) + 1)`` of the clean train models ``clean_signals`` and whose scale ``s`` is the signal's
    robust spread (1.4826 MAD) over them; the part's threshold becomes the logistic score that flags the same share of
    ``logistic_clean_scores`` (the logistic part's scores of clean train models, out of fold where the caller has
    them). The union then flags about a share ``fpr`` of clean models.

    A logistic part weighs what separates the train zoos' attacks, so a source that moves only attacks the train zoos
    lack gets little weight; an alarm needs no backdoored train model at all.
    """
    if not alarms:
        part.alarms = None
        return part
    if not clean_signals:
        raise ValueError("set_alarms needs clean train models")
    share = fpr / (len(alarms) + 1)
    out = {}
    for name in alarms:
        v = np.array([float(sig[name]) for sig in clean_signals])
        med = float(np.median(v))
        scale = MAD_CONSISTENCY * float(np.median(np.abs(v - med)))
        out[name] = [float(np.quantile(v, 1.0 - share)), max(scale, 1e-6)]
    part.alarms = out
    if logistic_clean_scores is not None:
        part.threshold = float(np.quantile(np.asarray(logistic_clean_scores, dtype=np.float64), 1.0 - share))
    return part


def fit_part(
    signals: Sequence[dict], labels: np.ndarray, c: float, candidate: Sequence[str], fpr: float = 0.05
) -> ScanHead:
    """[`fit_scan_head`] on a candidate's logistic signals and, where it names alarms, [`set_alarms`] on the fit
    rows' clean models (the logistic threshold at their in-sample quantile)."""
    logistic, alarms = split_candidate(candidate)
    part = fit_scan_head(signals, labels, c=c, signals=logistic)
    if alarms:
        clean = [signals[i] for i in np.flatnonzero(np.asarray(labels) == 0)]
        set_alarms(part, clean, alarms, fpr, [part.score(x) for x in clean])
    return part


def part_cv_scores(rows: Sequence[dict], signals: Sequence[str], c: float, repeats: int = 20) -> list[np.ndarray]:
    """Per repeat, every row's score by a part ([`fit_scan_head`] on ``signals``) fit on the other folds of a
    stratified 5-fold split (strata: dataset and label)."""
    y = _labels(rows)
    x = [r["metashield"]["signals"] for r in rows]

    def fit_and_score(fit: np.ndarray, held: np.ndarray) -> list[float]:
        part = fit_part([x[i] for i in fit], y[fit], c, signals)
        return [part.score(x[i]) for i in held]

    return repeated_cv([f"{r['dataset']}{y[i]}" for i, r in enumerate(rows)], fit_and_score, repeats)


def mean_auroc(runs: Sequence[np.ndarray], rows: Sequence[dict]) -> float:
    """The mean over the repeats ``runs`` of the rows' out-of-fold AUROC."""
    from ..evaluation.metrics import auroc

    y = _labels(rows)
    return float(np.mean([auroc(scores, y) for scores in runs]))


def leave_attack_out_auroc(
    rows: Sequence[dict], signals: Sequence[str], c: float, repeats: int = 4, folds: int = 5
) -> dict[str, float]:
    """How well a part on ``signals`` finds an attack it was not fit on: for every attack of the backdoored ``rows``
    (their ``"attack"`` column), the AUROC of that attack's models against the clean rows, each scored by a part fit
    on the other attacks' models and the other folds of the clean rows (``folds``-fold, reshuffled ``repeats`` times;
    a backdoored model's score is its mean over the folds). Returns the AUROC per attack, averaged over the repeats.

    A part chosen by ordinary cross-validation rewards signals that find the train zoos' own attacks; this one
    rewards signals that carry over to an attack the fit never saw, which is what a scan meets in the wild.
    """
    from sklearn.model_selection import KFold

    from ..evaluation.metrics import auroc

    y = _labels(rows)
    x = [r["metashield"]["signals"] for r in rows]
    attacks = np.array([str(r.get("attack")) for r in rows])
    clean = np.flatnonzero(y == 0)
    out: dict[str, list[float]] = {}
    for attack in sorted(set(attacks[y == 1])):
        held_bd = np.flatnonzero((y == 1) & (attacks == attack))
        other_bd = np.flatnonzero((y == 1) & (attacks != attack))
        if not len(other_bd):
            continue
        for rep in range(repeats):
            bd_scores = np.zeros(len(held_bd))
            clean_scores = np.zeros(len(clean))
            splits = KFold(min(folds, len(clean)), shuffle=True, random_state=rep).split(clean)
            for n_fit, (fit_c, held_c) in enumerate(splits, start=1):
                fit = np.concatenate([other_bd, clean[fit_c]])
                part = fit_part([x[i] for i in fit], y[fit], c, signals)
                bd_scores += ([part.score(x[i]) for i in held_bd] - bd_scores) / n_fit
                clean_scores[held_c] = [part.score(x[i]) for i in clean[held_c]]
            labels = np.r_[np.ones(len(held_bd)), np.zeros(len(clean))]
            out.setdefault(attack, []).append(auroc(np.r_[bd_scores, clean_scores], labels))
    return {attack: float(np.mean(v)) for attack, v in out.items()}


CRITERIA = ("cv", "leave_attack_out")


@dataclass
class PartChoice:
    """What [`choose_part`] chose, and how.

    Attributes:
        part: the fitted part (a [`ScanHead`] without parts of its own), its threshold set where asked.
        signals / c: the chosen candidate.
        cv_auroc: its mean out-of-fold AUROC on the train rows.
        candidates: every candidate's mean out-of-fold AUROC, by ``(signals, c)``.
        criterion: what chose it (``"cv"``, or ``"leave_attack_out"``: the mean over attacks of
            [`leave_attack_out_auroc`]).
        scores: every candidate's value of the criterion (the same as ``candidates`` for ``"cv"``).
        per_attack: for ``"leave_attack_out"``, every candidate's AUROC per held-out attack.
    """

    part: ScanHead
    signals: tuple[str, ...]
    c: float
    cv_auroc: float
    candidates: dict[tuple[tuple[str, ...], float], float]
    criterion: str = "cv"
    scores: dict[tuple[tuple[str, ...], float], float] | None = None
    per_attack: dict[tuple[tuple[str, ...], float], dict[str, float]] | None = None

    @property
    def score(self) -> float:
        """The chosen candidate's value of the criterion."""
        return (self.scores or self.candidates)[(self.signals, self.c)]


def choose_part(
    rows: Sequence[dict],
    candidates: Sequence[Sequence[str]],
    cs: Sequence[float] = (0.1, 1.0, 10.0),
    *,
    target_fpr: float = 0.05,
    name: str = "",
    criterion: str = "cv",
) -> PartChoice:
    """Choose a head part's signals and C among ``candidates x cs`` by repeated stratified 5-fold cross-validation on
    the train ``rows`` ([`part_cv_scores`]), fit it on all of them, and set its verdict threshold where that
    cross-validation flags a share ``target_fpr`` of the clean rows (0: the probability 0.5).

    A part fit with a strong L2 penalty scores clean models near the train set's share of backdoored ones, so 0.5 says
    little about how many it flags; the threshold ties the verdict to a false-positive rate instead.

    Args:
        rows: scan records of train models, each a scan of the part's variant.
        candidates: signal sets to choose among.
        cs: inverse L2 strengths to choose among.
        target_fpr: the share of clean train models the threshold flags.
        name: the variant's name, for the part's ``source``.
        criterion: ``"cv"`` (the mean out-of-fold AUROC) or ``"leave_attack_out"`` (the mean over the backdoored
            rows' attacks of [`leave_attack_out_auroc`]); ties go to the earlier candidate and the smaller C.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    runs = {(tuple(s), c): part_cv_scores(rows, tuple(s), c) for s in candidates for c in cs}
    choice = {k: mean_auroc(v, rows) for k, v in runs.items()}
    scores, per_attack = choice, None
    if criterion == "leave_attack_out":
        per_attack = {k: leave_attack_out_auroc(rows, k[0], k[1]) for k in runs}
        scores = {k: float(np.mean(list(v.values()))) for k, v in per_attack.items()}
    (signals, c), _ = max(scores.items(), key=lambda kv: kv[1])
    best = choice[(signals, c)]
    y = _labels(rows)
    x = [r["metashield"]["signals"] for r in rows]
    logistic, alarms = split_candidate(signals)
    part = fit_scan_head(x, y, c=c, signals=logistic)
    if target_fpr and alarms:  # the evidence union: the logistic part's out-of-fold threshold and the alarms'
        oof = runs.get((logistic, c)) or part_cv_scores(rows, logistic, c)
        clean_oof = np.concatenate([scores[y == 0] for scores in oof])
        set_alarms(part, [x[i] for i in np.flatnonzero(y == 0)], alarms, target_fpr, clean_oof)
    elif target_fpr:
        part.threshold = fpr_threshold(runs[(signals, c)], y == 0, target_fpr)
    part.source = f"fit on {len(rows)} image models scanned with the {name} synthesis ({int(y.sum())} bd)"
    return PartChoice(part, signals, c, best, choice, criterion, scores, per_attack)


def with_part(head: ScanHead, key: str, part: ScanHead) -> ScanHead:
    """A copy of ``head`` whose ``by_modality[key]`` is ``part`` (added or replaced)."""
    parts = {k: v for k, v in (head.by_modality or {}).items() if k != key}
    new = {k: v for k, v in part.__dict__.items() if k != "by_modality"}
    return ScanHead(**{**head.__dict__, "by_modality": {**parts, key: new}})


def read_records(path: str | os.PathLike) -> list[dict]:
    """The scan records of a JSONL file (one per line, see [`scan_record`]), refreshed ([`refresh_record`])."""
    lines = Path(path).read_text().splitlines()
    return [refresh_record(json.loads(line)) for line in lines if line.strip()]


@dataclass
class HeadFit:
    """What [`fit_head_from_spec`] fit, and on which records.

    Attributes:
        head: the head with its text parts and variant parts.
        train: the train records of the image head and the text parts.
        parts: per variant part (``"blend"``, ``"source"``), its [`PartChoice`].
        part_rows: per variant part, the train records it was chosen and fit on.
        declined: per variant part that its spec's ``min_gain`` kept out of the head, why.
        targets: per variant part whose spec has a ``target`` entry, its [`TargetChoice`].
    """

    head: ScanHead
    train: list[dict]
    parts: dict[str, PartChoice]
    part_rows: dict[str, list[dict]]
    declined: dict[str, str] = field(default_factory=dict)
    targets: dict = field(default_factory=dict)


def fit_head_from_spec(spec: dict, records: str | os.PathLike) -> HeadFit:
    """Fit a whole scan head as ``spec`` says (the layout of ``benchmarks/scan/configs/head.yaml``): the image head
    and the text parts by [`fit_heads`] on ``spec["base"]`` (with ``target_fpr``, their verdict thresholds flag that
    share of their clean train models out of fold, [`set_fpr_thresholds`]), then each of ``spec["parts"]`` by [`choose_part`] among the
    base signals plus its extra ones (all, each of its ``groups``, or each alone; the base alone too where
    ``with_base``), by its ``criterion`` (default ``"cv"``, see [`choose_part`]). A part with ``min_gain`` joins the
    head only if its chosen candidate weighs an extra signal and beats the base alone by at least that much on the
    criterion; otherwise the head keeps what it had and ``declined`` says why. Record files are named relative to the
    folder ``records``; a part's ``standard`` files contribute only the models that the base's ``standard`` file puts
    in the train split.

    Raises:
        ValueError: a part's records were not scanned with its variant's synthesis.
    """
    folder = Path(records)
    base = spec["base"]
    standard = read_records(folder / base["standard"])
    split_of = {r["model_id"]: r["split"] for r in standard}
    train = [r for r in standard if r["split"] == "train"]
    train += [r for name in base["extra_train"] for r in read_records(folder / name)]
    text_signals, large_signals = tuple(base["text_signals"]), tuple(base["large_vocabulary_signals"])
    head = fit_heads(train, base["c"], text_signals, base["text_c"], large_signals)
    if base.get("target_fpr"):  # the image head's and the text parts' verdict thresholds, as the variant parts'
        runs = out_of_fold_scores(train, base["c"], text_signals, base["text_c"], large_signals)
        set_fpr_thresholds(head, train, runs, base["target_fpr"])
    parts, part_rows, declined, targets = {}, {}, {}, {}
    for name, part in spec.get("parts", {}).items():
        rows = [
            r
            for f in part.get("standard", [])
            for r in read_records(folder / f)
            if split_of.get(r["model_id"]) == "train"
        ]
        rows += [r for f in part["extra_train"] for r in read_records(folder / f)]
        other = [r["model_id"] for r in rows if record_variant(r) != name]
        if other:
            raise ValueError(
                f"part {name!r}: {len(other)} records were not scanned with its synthesis, e.g. {other[0]}"
            )
        base_signals = tuple(part["base"])
        if part.get("min_gain") is not None and not part.get("with_base"):
            raise ValueError(f"part {name!r}: min_gain compares with the base alone, so it needs with_base: true")
        candidates = [base_signals] if part.get("with_base") else []
        candidates += [base_signals + tuple(part["extra"])]
        candidates += [base_signals + tuple(g) for g in part.get("groups", [])]
        candidates += [(*base_signals, s) for s in part["extra"]]
        alarm_sets = part.get("alarms") or [[]]
        candidates = [
            (*cand, *(ALARM_PREFIX + a for a in alarm_set)) for alarm_set in alarm_sets for cand in candidates
        ]
        candidates = list(dict.fromkeys(candidates))
        choice = choose_part(
            rows, candidates, part["cs"], target_fpr=part["target_fpr"], name=name,
            criterion=part.get("criterion", "cv"),
        )  # fmt: skip
        parts[name], part_rows[name] = choice, rows
        min_gain = part.get("min_gain")
        if min_gain is not None:
            scores = choice.scores or choice.candidates
            base_best = max(v for (sig, _), v in scores.items() if sig == base_signals)
            gain = choice.score - base_best
            if choice.signals == base_signals or gain < min_gain:
                declined[name] = (
                    f"best candidate {list(choice.signals[len(base_signals) :]) or 'base alone'} gains {gain:+.3f} over "
                    f"the base alone ({base_best:.3f}) on {choice.criterion}; min_gain {min_gain}"
                )
                continue
        if part.get("target"):  # the part's target chooser, on its backdoored train models
            targets[name] = part_target_choice(rows, part["target"])
            choice.part.target = targets[name].weights
        head = with_part(head, f"image/{name}", choice.part)
    return HeadFit(head, train, parts, part_rows, declined, targets)


def part_target_choice(rows: Sequence[dict], spec: dict):
    """[`choose_target_chooser`] on the backdoored ``rows`` (their per-class evidence, ``target_label`` and
    ``attack``) as a part's ``target`` spec says (``candidates``, ``cs``, ``min_gain``)."""
    from .target import choose_target_chooser

    bd = [r for r in rows if r["is_backdoored"]]
    return choose_target_chooser(
        [r["metashield"]["per_class"] for r in bd], [int(r["target_label"]) for r in bd], [str(r["attack"]) for r in bd],
        spec["candidates"], spec.get("cs", (0.1, 1.0)), min_gain=spec.get("min_gain", 0.0),
    )  # fmt: skip
