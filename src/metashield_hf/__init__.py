"""MetaShield: few-shot, meta-learned backdoor detection for classifiers of any domain."""

from __future__ import annotations

__version__ = "0.1.0"

from .configuration_metashield import MetaShieldConfig
from .hub import DEFAULT_DETECTOR_DIR, TASK, backdoor_detection_pipeline, load_detector, register, save_for_hub
from .modeling_metashield import MetaShieldDetector, MetaShieldOutput
from .pipeline_backdoor_detection import BackdoorDetectionPipeline
from .scan import ScanConfig, ScanHead, ScanReport, neural_cleanse_scan, scan_adapter, scan_model
from .shield import AdaptedShield, adapt
from .targets import load_target
from .targets.base import TargetOutput

register()

__all__ = [
    "AdaptedShield",
    "BackdoorDetectionPipeline",
    "DEFAULT_DETECTOR_DIR",
    "MetaShieldConfig",
    "MetaShieldDetector",
    "MetaShieldOutput",
    "TASK",
    "ScanConfig",
    "ScanHead",
    "ScanReport",
    "TargetOutput",
    "adapt",
    "backdoor_detection_pipeline",
    "load_detector",
    "load_target",
    "neural_cleanse_scan",
    "register",
    "save_for_hub",
    "scan_adapter",
    "scan_model",
]
