"""MetaShield: few-shot, meta-learned backdoor detection for classifiers of any domain.

The entry points users call: the input-level detector (``load_detector``, ``adapt``, the ``backdoor-detection``
pipeline), the model-level scan (``scan_model``), the FL screen (``score_client_updates``, and ``MetaShieldStrategy``
for Flower, imported when first used since ``flwr`` is optional) and the target adapters (``load_target``). Research
internals live in their subpackages (``metashield_hf.scan``, ``.fl``, ``.zoo``, ``.meta``, ``.evaluation``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from .configuration_metashield import MetaShieldConfig
from .fl.screen import score_client_updates
from .hub import TASK, backdoor_detection_pipeline, register, save_for_hub
from .loading import DEFAULT_DETECTOR_DIR, load_detector
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
    "score_client_updates",
    "MetaShieldStrategy",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing metashield_hf must not import flwr (an optional extra).
    if name == "MetaShieldStrategy":
        from .fl.strategy import MetaShieldStrategy

        return MetaShieldStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
