"""What a scan returns: [`ScanReport`] with one [`ClassEvidence`] per class."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass
class ClassEvidence:
    """What the scan found for one class.

    Attributes:
        class_index / label: the class and its name (``config.id2label`` where the model has one).
        trigger_size: smallest effective mask size (fraction of the perturbed space's entries); ``None`` for a text
            scan without the embedding synthesis (its trigger is the token trigger below).
        reached: whether the trigger flipped at least ``flip_threshold`` of the clean samples.
        flip_rate: fraction of clean samples (not already of this class) the recorded trigger flips.
        anomaly_index: ``(median - size) / (1.4826 * MAD)`` over classes; large = suspiciously easy to force
            (``None`` without the embedding synthesis).
        detector_score: mean input-level detector score of the perturbed clean samples (text scans without the
            embedding synthesis: with the class's token trigger inserted; ``None`` without detector).
        token_trigger: text models: the best token trigger found for this class (decoded), else ``None``.
        token_flip_rates: text models: flip rate of the best trigger of 1, 2, ... tokens.
        token_target_probs: text models: the mean probability of this class under those triggers.
        token_low_probs: text models: the lower quartile of that probability over the samples.
        token_dominance: text models: how often this class's best trigger of 1, 2, ... tokens beats the other
            classes' best triggers of that length.
        blend_size: with the blend synthesis (``ScanConfig.blend_steps``), the smallest blend ratio ``a`` of a
            whole-input trigger ``(1 - a) * x + a * p`` that flips the clean samples to this class, else ``None``.
        source_size: with the source-specific synthesis (``ScanConfig.source_steps``), the smallest mask that flips
            half of the clean samples to this class, else ``None``.
        max_margin: with the maximum-margin statistic (``ScanConfig.max_margin_steps``; MM-BD), the largest logit
            margin ``f_c(x) - max_{j != c} f_j(x)`` an input of the valid domain reached for this class, else ``None``.
        max_margin_z: its robust z-score over the classes, ``(margin - median) / (1.4826 * MAD)``; large = a class that
            can be forced abnormally far ahead.
        dormant_mass: with the dormant shortcut weights (``ScanConfig.dormancy``), the class's head weight on
            features the clean samples leave quiet ([`dormant_mass`]); large = a class that reads a shortcut.
        feature_size: with the feature-space inversion (``ScanConfig.feature_steps``), the smallest shift of an
            intermediate block's output (its norm relative to the clean features' spread) that flips the clean
            samples to this class, else ``None``.
        feature_anomaly: its anomaly index over the classes (large = abnormally easy to reach).
    """

    class_index: int
    label: str
    trigger_size: float | None
    reached: bool
    flip_rate: float
    anomaly_index: float | None
    detector_score: float | None = None
    token_trigger: str | None = None
    token_flip_rates: list[float] | None = None
    token_target_probs: list[float] | None = None
    token_low_probs: list[float] | None = None
    token_dominance: list[float] | None = None
    blend_size: float | None = None
    source_size: float | None = None
    max_margin: float | None = None
    max_margin_z: float | None = None
    dormant_mass: float | None = None
    feature_size: float | None = None
    feature_anomaly: float | None = None


@dataclass
class ScanReport:
    """Result of [`scan_model`] (or [`neural_cleanse_scan`]).

    Attributes:
        verdict: ``"backdoored"`` or ``"clean"``.
        score: backdoor score (MetaShield: probability in ``[0, 1]``; Neural Cleanse: the anomaly index).
        threshold: the score above which the verdict is ``"backdoored"``.
        suspected_target: the class whose trigger was smallest (text models: whose token trigger the detector flags
            most, or without the detector, whose token trigger forces it most).
        anomaly_index: the suspected target's anomaly index (``None`` for a text scan without embedding synthesis).
        signals: the model-level signals the head combines (see [`SIGNALS`]).
        per_class: one [`ClassEvidence`] per class.
        space: where the triggers were synthesized: ``"pixels"``, ``"features"``, ``"embeddings"``, or ``"tokens"``
            (a text scan by the token search alone).
        timings: seconds per stage (``load_s``, ``synthesis_s`` where the synthesis ran, ``detector_s``,
            ``total_s``; text models also ``token_search_s``).
        options: the scan options that made the report.
        synthesis: the mask synthesis's [`SynthesisResult`] (masks, patterns, outputs on the perturbed samples), for
            callers that reuse the synthesized triggers; ``None`` where it did not run. Not part of ``to_dict()``.
        fingerprint: a hash of the scanned model's parameters ([`model_fingerprint`]): [`shield`] and
            ``adapt(..., scan_report=)`` refuse a report of another model.
    """

    checkpoint: str
    method: str
    verdict: str
    score: float
    threshold: float
    suspected_target: int
    suspected_target_label: str
    anomaly_index: float | None
    signals: dict[str, float]
    per_class: list[ClassEvidence]
    n_clean_samples: int
    space: str
    timings: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    synthesis: Any = field(default=None, repr=False, compare=False)
    fingerprint: str | None = None

    @property
    def is_backdoored(self) -> bool:
        return self.verdict == "backdoored"

    def shield(self, detector, target, clean_samples, **adapt_options):
        """Protect the scanned model: ``adapt(detector, target, clean_samples, scan_report=self, ...)``, whose inner
        loop takes this scan's synthesized triggers as positives instead of synthesizing them again.

        Example:
            ```python
            >>> report = scan_model(model, clean_images[:20])
            >>> shield = report.shield(load_detector(), model, clean_images[:20])
            >>> shield.positives.source
            'scan_report'
            ```
        """
        from ..shield import adapt

        return adapt(detector, target, clean_samples, scan_report=self, **adapt_options)

    def to_dict(self) -> dict:
        """The report as JSON-able values (without the synthesis tensors)."""
        out = asdict(replace(self, synthesis=None))
        del out["synthesis"]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (what ``metashield scan --json`` prints)."""
        return json.dumps(self.to_dict(), indent=indent)
