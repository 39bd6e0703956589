"""The model-level head of the scan (DESIGN §2.6): a tiny logistic model over the scan signals, and its fit."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: Signals of every scan (from the per-class mask synthesis and the input-level detector) that the head combines:
#: the anomaly index and log size ratio of the suspected target, corrected for the number of classes (see
#: [`class_count_signals`]), and the detector's response to the synthesized inputs.
SYNTHESIS_SIGNALS = ("anomaly_excess", "log_size_z", "detector_response", "detector_response_gap")
#: The two synthesis signals before that correction (Neural Cleanse's rule reads the raw anomaly index).
RAW_SYNTHESIS_SIGNALS = ("anomaly_index", "log_size_ratio")
#: Signals of text models only (from the discrete token-trigger search, [`metashield_hf.token_search`]).
#: ``token_logit_2`` is the log-odds of ``token_prob_2``: a logistic head is linear in its inputs, and a probability
#: saturates just where a trigger and a natural class word differ (0.975 against 0.997 is 3.7 against 5.8 in
#: log-odds). ``token_detector`` is the largest over classes of the input-level detector's mean score on the clean
#: samples with the class's token trigger inserted times the share of them that trigger flips (0 for a scan run
#: without the detector).
TOKEN_SIGNALS = (
    "token_flip",
    "token_prob",
    "token_flip_2",
    "token_prob_2",
    "token_prob_low",
    "token_prob_low_2",
    "token_dominance",
    "token_dominance_2",
    "token_logit_2",
    "token_detector",
)
#: Signals of an image scan with the blend synthesis (``scan_model``'s default, ``blend_steps``): the
#: class-count-corrected anomaly index and log size ratio of the class whose smallest whole-input blend
#: ``(1 - a) * x + a * p`` is the outlier (see ``synthesize_triggers(uniform_mask=True)``).
BLEND_SIGNALS = ("blend_anomaly_excess", "blend_log_size_z")
#: Signals of an image scan with the opt-in source-specific synthesis (``scan_model(source_steps=...)``): the same two
#: for the class whose smallest mask that flips the *easiest half* of the clean samples is the outlier, the form of a
#: source-specific trigger (TaCT), which flips only some classes' inputs.
SOURCE_SIGNALS = ("source_anomaly_excess", "source_log_size_z")
SIGNALS = SYNTHESIS_SIGNALS + RAW_SYNTHESIS_SIGNALS + TOKEN_SIGNALS + BLEND_SIGNALS + SOURCE_SIGNALS
#: The variant of a text scan whose vocabulary the token search prefilters (pretrained checkpoints: 30k-250k tokens);
#: a head's ``by_modality["text/large_vocabulary"]`` part scores those scans (see [`ScanHead.for_modality`]).
LARGE_VOCABULARY = "large_vocabulary"
#: The variant of an image scan with the blend synthesis: a head's ``by_modality["image/blend"]`` part scores it.
BLEND = "blend"
#: The variant of an image scan with the source-specific synthesis: a head's ``by_modality["image/source"]`` part.
SOURCE = "source"
#: The part a variant's scan falls back to where the head has none for it (or lacks its signals): a source-specific
#: scan also ran the blend synthesis (scan_model's default), so it is scored as a blend scan, then as a plain one.
VARIANT_FALLBACK = {SOURCE: BLEND}
DEFAULT_SCAN_HEAD = Path(__file__).parent / "default_detector" / "scan_head.json"


# ---- the model-level head ---------------------------------------------------------------------------------------
@dataclass
class ScanHead:
    """A tiny logistic model over the scan signals: ``score = sigmoid(bias + Σ weights[s] * signals[s])``.

    The shipped default (``default_detector/scan_head.json``) is fit with [`fit_scan_head`] on the 80-step scans of
    the standard zoo's train models (``scripts/scan_benchmark.py``); the hand-set prior it replaced was Neural
    Cleanse's rule (anomaly index > 2 ⇒ score > 0.5), kept in ``reports/scan.prior_head.json``.

    Attributes:
        weights: one weight per name in [`SIGNALS`] (missing names weigh 0).
        bias: the intercept.
        threshold: score above which the verdict is ``"backdoored"``.
        source: where the weights come from (``"prior"`` or a description of the fit).
        by_modality: heads for one target modality (``"text"``, ``"image"``, ``"tensor"``), or for a variant of
            one (``"text/large_vocabulary"``), as dicts of these same fields; a scan of such a model uses that head
            instead (text scans have the token signals, whose meaning differs from the image signals; and a search
            that prefilters a pretrained model's large vocabulary finds natural words as strong as a trigger, so its
            probability signals mean less there than the detector's).
    """

    weights: dict[str, float]
    bias: float
    threshold: float = 0.5
    source: str = "prior"
    by_modality: dict[str, dict] | None = None

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
        return sorted(n for n, w in self.weights.items() if w and n not in signals)

    def logit(self, signals: dict[str, float]) -> float:
        unknown = sorted(set(self.weights) - set(SIGNALS))
        if unknown:
            raise ValueError(f"scan head has weights for unknown signals {unknown}; known: {list(SIGNALS)}")
        missing = self.missing(signals)
        if missing:
            raise ValueError(f"the scan head needs signals {missing}, which this scan did not produce")
        return self.bias + sum(w * float(signals[name]) for name, w in self.weights.items() if w)

    def score(self, signals: dict[str, float]) -> float:
        """The backdoor probability in ``[0, 1]`` for one model's signals."""
        z = self.logit(signals)
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> ScanHead:
        """Read a head saved with [`save`] (the shipped default when ``path`` is None)."""
        path = DEFAULT_SCAN_HEAD if path is None else Path(path)
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"cannot read a scan head from {path}: {err}") from err


# Neural Cleanse's rule as a head (anomaly index > 2 => score > 0.5): the shipped default before it was refit on the
# zoo, and still the FL screen's head, whose short scans (40 steps) the refit head was not fit on.
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
