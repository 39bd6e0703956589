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
- `batch.py`: [`scan_many`]: many checkpoints (a list, the Hugging Face cache) into one resumable parquet table
- `positives.py`: the synthesized triggers as adaptation's inner-loop positives ([`synthesized_positives`],
  [`positives_from_report`]) and the model fingerprint that ties a report to its model
- `neural_cleanse.py`: [`neural_cleanse_scan`]
- `max_margin.py`: [`max_margins`], the per-class maximum achievable logit margin (MM-BD), trigger-agnostic
- `feature_inversion.py`: [`invert_features`], per-class trigger inversion in an intermediate layer's feature space
  (FeatureRE / BTI-DBF-like), trigger-agnostic
- `dormant.py`: [`dormant_mass`], each class's head weight on features the clean samples leave quiet, trigger-agnostic
- `query_probe.py`: [`QueryProbe`], learned query inputs and a meta-classifier of the answers, trained on a zoo (MNTD;
  a peer method, not part of the default scan)
- `progress.py`: the progress bars' on/off rule and the cost estimate logged before a scan

Every name is imported when first used (PEP 562): ``metashield scan --help`` builds its flags from
[`ScanConfig`] without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_namespace

if TYPE_CHECKING:
    from .batch import (
        BATCH_COLUMNS,
        BatchScanResult,
        CheckpointRef,
        cached_classifiers,
        is_classifier_folder,
        load_scan_table,
        read_checkpoint_list,
        resolve_checkpoint,
        scan_many,
    )
    from .config import DEFAULT_BLEND_STEPS, MIN_SCAN_SAMPLES, SOURCE_FLIP_THRESHOLD, SOURCE_LOSS_QUANTILE, ScanConfig
    from .dormant import DORMANT_FLOOR, dormant_mass
    from .feature_inversion import FeatureInversionResult, feature_block, invert_features
    from .head import (
        ALARM_PREFIX,
        DEFAULT_SCAN_HEAD,
        NEURAL_CLEANSE_RULE_HEAD,
        HeadFit,
        PartChoice,
        ScanHead,
        choose_part,
        cv_head_c,
        fit_head_from_spec,
        fit_heads,
        fit_part,
        fit_scan_head,
        fpr_threshold,
        leave_attack_out_auroc,
        out_of_fold_scores,
        read_records,
        record_modality,
        record_variant,
        refresh_record,
        repeated_cv,
        scan_record,
        score_record,
        set_alarms,
        set_fpr_thresholds,
        split_candidate,
        verdict_threshold,
        with_part,
    )
    from .max_margin import MaxMarginResult, logit_margins, max_margins
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
    from .query_probe import (
        QueryProbe,
        QueryProbeConfig,
        QuerySpace,
        query_features,
        query_space,
        train_query_probe,
    )
    from .report import ClassEvidence, ScanReport
    from .scanner import (
        checkpoint_name,
        prepare_clean_items,
        run_synthesis,
        scan_adapter,
        scan_model,
        trigger_agnostic_evidence,
    )
    from .signals import (
        AGNOSTIC,
        BLEND,
        BLEND_SIGNALS,
        DORMANT_SIGNALS,
        FEATURE_SIGNALS,
        LARGE_VOCABULARY,
        MAX_MARGIN_SIGNALS,
        SIGNALS,
        SOURCE,
        SOURCE_SIGNALS,
        SYNTHESIS_SIGNALS,
        TOKEN_SIGNALS,
        class_count_signals,
        dormant_signals,
        max_margin_signals,
        token_detector_signal,
        token_signals,
    )
    from .synthesis import SynthesisResult, anomaly_indices, chance_anomaly_index, synthesize_triggers
    from .token_search import TokenSearchResult, search_token_triggers

# Each name and the module that defines it, imported on first access.
_LAZY = {
    "BATCH_COLUMNS": ".batch",
    "BatchScanResult": ".batch",
    "CheckpointRef": ".batch",
    "cached_classifiers": ".batch",
    "is_classifier_folder": ".batch",
    "load_scan_table": ".batch",
    "read_checkpoint_list": ".batch",
    "resolve_checkpoint": ".batch",
    "scan_many": ".batch",
    "DEFAULT_BLEND_STEPS": ".config",
    "MIN_SCAN_SAMPLES": ".config",
    "SOURCE_FLIP_THRESHOLD": ".config",
    "SOURCE_LOSS_QUANTILE": ".config",
    "ScanConfig": ".config",
    "DEFAULT_SCAN_HEAD": ".head",
    "NEURAL_CLEANSE_RULE_HEAD": ".head",
    "HeadFit": ".head",
    "PartChoice": ".head",
    "ScanHead": ".head",
    "choose_part": ".head",
    "ALARM_PREFIX": ".head",
    "fit_part": ".head",
    "set_alarms": ".head",
    "split_candidate": ".head",
    "DORMANT_FLOOR": ".dormant",
    "QueryProbe": ".query_probe",
    "QueryProbeConfig": ".query_probe",
    "QuerySpace": ".query_probe",
    "query_features": ".query_probe",
    "query_space": ".query_probe",
    "train_query_probe": ".query_probe",
    "dormant_mass": ".dormant",
    "DORMANT_SIGNALS": ".signals",
    "dormant_signals": ".signals",
    "cv_head_c": ".head",
    "fit_head_from_spec": ".head",
    "fit_heads": ".head",
    "fit_scan_head": ".head",
    "fpr_threshold": ".head",
    "leave_attack_out_auroc": ".head",
    "out_of_fold_scores": ".head",
    "read_records": ".head",
    "record_modality": ".head",
    "record_variant": ".head",
    "refresh_record": ".head",
    "repeated_cv": ".head",
    "scan_record": ".head",
    "score_record": ".head",
    "set_fpr_thresholds": ".head",
    "verdict_threshold": ".head",
    "with_part": ".head",
    "FeatureInversionResult": ".feature_inversion",
    "feature_block": ".feature_inversion",
    "invert_features": ".feature_inversion",
    "MaxMarginResult": ".max_margin",
    "logit_margins": ".max_margin",
    "max_margins": ".max_margin",
    "NEURAL_CLEANSE_THRESHOLD": ".neural_cleanse",
    "neural_cleanse_scan": ".neural_cleanse",
    "AUTO_SYNTHESIZED_MODALITIES": ".positives",
    "POSITIVES": ".positives",
    "SynthesizedPositives": ".positives",
    "model_fingerprint": ".positives",
    "positives_for": ".positives",
    "positives_from_report": ".positives",
    "synthesized_positives": ".positives",
    "ClassEvidence": ".report",
    "ScanReport": ".report",
    "checkpoint_name": ".scanner",
    "prepare_clean_items": ".scanner",
    "run_synthesis": ".scanner",
    "scan_adapter": ".scanner",
    "scan_model": ".scanner",
    "trigger_agnostic_evidence": ".scanner",
    "AGNOSTIC": ".signals",
    "BLEND": ".signals",
    "BLEND_SIGNALS": ".signals",
    "FEATURE_SIGNALS": ".signals",
    "LARGE_VOCABULARY": ".signals",
    "MAX_MARGIN_SIGNALS": ".signals",
    "SIGNALS": ".signals",
    "SOURCE": ".signals",
    "SOURCE_SIGNALS": ".signals",
    "SYNTHESIS_SIGNALS": ".signals",
    "TOKEN_SIGNALS": ".signals",
    "class_count_signals": ".signals",
    "max_margin_signals": ".signals",
    "token_detector_signal": ".signals",
    "token_signals": ".signals",
    "SynthesisResult": ".synthesis",
    "anomaly_indices": ".synthesis",
    "chance_anomaly_index": ".synthesis",
    "synthesize_triggers": ".synthesis",
    "TokenSearchResult": ".token_search",
    "search_token_triggers": ".token_search",
}

__all__ = [
    "BATCH_COLUMNS",
    "BatchScanResult",
    "CheckpointRef",
    "cached_classifiers",
    "is_classifier_folder",
    "load_scan_table",
    "read_checkpoint_list",
    "resolve_checkpoint",
    "scan_many",
    "AGNOSTIC",
    "BLEND",
    "BLEND_SIGNALS",
    "DEFAULT_BLEND_STEPS",
    "DEFAULT_SCAN_HEAD",
    "FEATURE_SIGNALS",
    "FeatureInversionResult",
    "LARGE_VOCABULARY",
    "MAX_MARGIN_SIGNALS",
    "MaxMarginResult",
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
    "ALARM_PREFIX",
    "fit_part",
    "set_alarms",
    "split_candidate",
    "DORMANT_FLOOR",
    "dormant_mass",
    "QueryProbe",
    "QueryProbeConfig",
    "QuerySpace",
    "query_features",
    "query_space",
    "train_query_probe",
    "DORMANT_SIGNALS",
    "dormant_signals",
    "class_count_signals",
    "cv_head_c",
    "fit_heads",
    "fit_scan_head",
    "feature_block",
    "fpr_threshold",
    "invert_features",
    "logit_margins",
    "max_margin_signals",
    "max_margins",
    "neural_cleanse_scan",
    "leave_attack_out_auroc",
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
    "trigger_agnostic_evidence",
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


__getattr__, __dir__ = lazy_namespace(__name__, _LAZY, __all__, globals())
