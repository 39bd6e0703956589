"""Model-level scan: is a checkpoint backdoored, and which class is the target?

Laid out like a PEFT tuner: [`ScanConfig`] holds every option, [`scan_model`] / [`scan_adapter`] run the scan and
return a [`ScanReport`], [`ScanHead`] combines the signals, and [`neural_cleanse_scan`] is the baseline on the same
synthesis.

- `config.py`: [`ScanConfig`]
- `report.py`: [`ScanReport`], [`ClassEvidence`]
- `synthesis.py`: per-class trigger synthesis (mask + pattern, blend, source-specific) and the anomaly index
- `token_search.py`: discrete token-trigger search for text models
- `signals.py`: the model-level signals and their names
- `head.py`: [`ScanHead`] and its fitting on scan records (cross-validation, false-positive thresholds)
- `scanner.py`: [`scan_model`], [`scan_adapter`]
- `positives.py`: the synthesized triggers as adaptation's inner-loop positives ([`synthesized_positives`],
  [`positives_from_report`]) and the model fingerprint that ties a report to its model
- `neural_cleanse.py`: [`neural_cleanse_scan`]
"""

from __future__ import annotations

from .config import DEFAULT_BLEND_STEPS, MIN_SCAN_SAMPLES, SOURCE_FLIP_THRESHOLD, SOURCE_LOSS_QUANTILE, ScanConfig
from .head import (
    DEFAULT_SCAN_HEAD,
    NEURAL_CLEANSE_RULE_HEAD,
    HeadFit,
    PartChoice,
    ScanHead,
    choose_part,
    cv_head_c,
    fit_head_from_spec,
    fit_heads,
    fit_scan_head,
    fpr_threshold,
    out_of_fold_scores,
    read_records,
    record_modality,
    record_variant,
    refresh_record,
    repeated_cv,
    scan_record,
    score_record,
    set_fpr_thresholds,
    verdict_threshold,
    with_part,
)
from .neural_cleanse import NEURAL_CLEANSE_THRESHOLD, neural_cleanse_scan
from .positives import (
    AUTO_SYNTHESIZED_MODALITIES,
    POSITIVES,
    SynthesizedPositives,
    model_fingerprint,
    positives_for,
    positives_from_report,
    synthesized_positives,
)
from .report import ClassEvidence, ScanReport
from .scanner import checkpoint_name, prepare_clean_items, run_synthesis, scan_adapter, scan_model
from .signals import (
    BLEND,
    BLEND_SIGNALS,
    LARGE_VOCABULARY,
    SIGNALS,
    SOURCE,
    SOURCE_SIGNALS,
    SYNTHESIS_SIGNALS,
    TOKEN_SIGNALS,
    class_count_signals,
    token_detector_signal,
    token_signals,
)
from .synthesis import SynthesisResult, anomaly_indices, chance_anomaly_index, synthesize_triggers
from .token_search import TokenSearchResult, search_token_triggers

__all__ = [
    "BLEND",
    "BLEND_SIGNALS",
    "DEFAULT_BLEND_STEPS",
    "DEFAULT_SCAN_HEAD",
    "LARGE_VOCABULARY",
    "MIN_SCAN_SAMPLES",
    "NEURAL_CLEANSE_RULE_HEAD",
    "NEURAL_CLEANSE_THRESHOLD",
    "SIGNALS",
    "SOURCE",
    "SOURCE_FLIP_THRESHOLD",
    "SOURCE_LOSS_QUANTILE",
    "SOURCE_SIGNALS",
    "SYNTHESIS_SIGNALS",
    "TOKEN_SIGNALS",
    "ClassEvidence",
    "PartChoice",
    "ScanConfig",
    "ScanHead",
    "ScanReport",
    "SynthesisResult",
    "TokenSearchResult",
    "anomaly_indices",
    "chance_anomaly_index",
    "checkpoint_name",
    "choose_part",
    "class_count_signals",
    "cv_head_c",
    "fit_heads",
    "fit_scan_head",
    "fpr_threshold",
    "neural_cleanse_scan",
    "out_of_fold_scores",
    "prepare_clean_items",
    "record_modality",
    "record_variant",
    "read_records",
    "fit_head_from_spec",
    "HeadFit",
    "repeated_cv",
    "refresh_record",
    "run_synthesis",
    "scan_adapter",
    "scan_model",
    "scan_record",
    "score_record",
    "search_token_triggers",
    "set_fpr_thresholds",
    "synthesize_triggers",
    "token_detector_signal",
    "token_signals",
    "verdict_threshold",
    "with_part",
    "AUTO_SYNTHESIZED_MODALITIES",
    "POSITIVES",
    "SynthesizedPositives",
    "positives_for",
    "model_fingerprint",
    "positives_from_report",
    "synthesized_positives",
]
