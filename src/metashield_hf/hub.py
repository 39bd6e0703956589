"""Registration with the transformers Auto classes and the pipeline registry, and the folder layout a Hub repo needs.

``load_detector`` and ``DEFAULT_DETECTOR_DIR`` live in ``loading.py`` (beside the model, without the pipeline) and
are re-exported here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import pipeline

from .loading import DEFAULT_DETECTOR_DIR, load_detector
from .modeling_metashield import MetaShieldDetector
from .pipeline_backdoor_detection import BackdoorDetectionPipeline
from .registration import TASK, register_task

__all__ = [
    "DEFAULT_DETECTOR_DIR",
    "TASK",
    "backdoor_detection_pipeline",
    "load_detector",
    "register",
    "save_for_hub",
]

_CODE_FILES = ("configuration_metashield.py", "modeling_metashield.py", "pipeline_backdoor_detection.py")


def register() -> None:
    """Register ``metashield`` with AutoConfig/AutoModel and the ``backdoor-detection`` task now (idempotent).

    ``import metashield_hf`` already does this as soon as transformers loads those registries
    ([`metashield_hf.registration`]); calling it is only needed to register eagerly.
    """
    register_task()


def backdoor_detection_pipeline(target_model, clean_samples, detector=None, **kwargs) -> BackdoorDetectionPipeline:
    """``pipeline("backdoor-detection", ...)`` with the embedded detector by default (works without the task name)."""
    return pipeline(TASK, model=detector, target_model=target_model, clean_samples=clean_samples, **kwargs)


def save_for_hub(detector: MetaShieldDetector, folder: str | Path, model_card: str | None = None) -> list[str]:
    """Write exactly what a Hub model repo needs: ``config.json`` (with ``auto_map`` and ``custom_pipelines``),
    ``model.safetensors``, the three code files, and ``README.md``.

    ``custom_pipelines`` is added only here: a local folder with it asks for ``trust_remote_code`` even when the
    package is imported, so the embedded detector is saved without it.

    Returns:
        The sorted file names written.
    """
    folder = Path(folder)
    detector.save_pretrained(folder)  # config.json (+ auto_map), model.safetensors, configuration/modeling code
    for name in _CODE_FILES:
        shutil.copyfile(Path(__file__).parent / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["custom_pipelines"] = {
        TASK: {
            "impl": "pipeline_backdoor_detection.BackdoorDetectionPipeline",
            "pt": ["AutoModel"],
            "type": "multimodal",
        }
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model_card is None:
        model_card = (
            "---\nlibrary_name: transformers\ntags: [backdoor-detection, ai-safety, custom_code]\n---\n"
            "# MetaShield detector\n\nNeeds `pip install metashield-hf` for the `backdoor-detection` pipeline.\n"
        )
    (folder / "README.md").write_text(model_card)
    return sorted(p.name for p in folder.iterdir())
