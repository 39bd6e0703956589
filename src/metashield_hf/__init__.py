"""MetaShield: few-shot, meta-learned backdoor detection for classifiers of any domain.

The entry points users call: the input-level detector (``load_detector``, ``adapt``, the ``backdoor-detection``
pipeline), the model-level scan (``scan_model``, and ``scan_many`` for a list or the Hugging Face cache), the FL
screen (``score_client_updates``, and ``MetaShieldStrategy`` for Flower) and the target adapters (``load_target``).
Research internals live in their subpackages (``metashield_hf.scan``, ``.fl``, ``.zoo``, ``.meta``, ``.evaluation``).

Every name is imported when first used (PEP 562), so ``import metashield_hf`` and the CLI's ``--help`` do not pay for
torch, transformers' pipelines or ``flwr`` (an optional extra). The ``backdoor-detection`` task and the Auto classes
are registered as soon as transformers loads its registries ([`metashield_hf.registration`]), so
``pipeline("backdoor-detection", ...)`` works after ``import metashield_hf`` whichever is imported first.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .lazy import lazy_namespace
from .registration import register_when_imported

if TYPE_CHECKING:
    from .configuration_metashield import MetaShieldConfig
    from .fl.screen import score_client_updates
    from .fl.strategy import MetaShieldStrategy
    from .hub import TASK, backdoor_detection_pipeline, register, save_for_hub
    from .loading import DEFAULT_DETECTOR_DIR, load_detector
    from .modeling_metashield import MetaShieldDetector, MetaShieldOutput
    from .pipeline_backdoor_detection import BackdoorDetectionPipeline
    from .scan import ScanConfig, ScanHead, ScanReport, neural_cleanse_scan, scan_adapter, scan_many, scan_model
    from .shield import AdaptedShield, adapt
    from .targets import load_target
    from .targets.base import TargetOutput

# Each public name and the module that defines it, imported on first access.
_LAZY = {
    "AdaptedShield": ".shield",
    "BackdoorDetectionPipeline": ".pipeline_backdoor_detection",
    "DEFAULT_DETECTOR_DIR": ".loading",
    "MetaShieldConfig": ".configuration_metashield",
    "MetaShieldDetector": ".modeling_metashield",
    "MetaShieldOutput": ".modeling_metashield",
    "MetaShieldStrategy": ".fl.strategy",
    "TASK": ".registration",
    "ScanConfig": ".scan.config",
    "ScanHead": ".scan.head",
    "ScanReport": ".scan.report",
    "TargetOutput": ".targets.base",
    "adapt": ".shield",
    "backdoor_detection_pipeline": ".hub",
    "load_detector": ".loading",
    "load_target": ".targets",
    "neural_cleanse_scan": ".scan.neural_cleanse",
    "register": ".hub",
    "save_for_hub": ".hub",
    "scan_adapter": ".scan.scanner",
    "scan_many": ".scan.batch",
    "scan_model": ".scan.scanner",
    "score_client_updates": ".fl.screen",
}

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
    "scan_many",
    "scan_model",
    "score_client_updates",
    "MetaShieldStrategy",
]


__getattr__, __dir__ = lazy_namespace(__name__, _LAZY, __all__, globals())


register_when_imported()  # last: a registry already loaded registers now, and that imports modules of this package
