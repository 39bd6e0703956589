"""Registration with transformers' Auto classes and pipeline registry, run when transformers loads them.

``import metashield_hf`` must make ``pipeline("backdoor-detection")`` and ``AutoModel.from_pretrained`` of a MetaShield
folder work, but the registries live in modules that import torch (seconds), which the CLI's flag parsing and
``--help`` never need. So [`register_when_imported`] registers at once what transformers has already loaded and, for
the rest, puts a finder on ``sys.meta_path`` that watches three module names and runs the matching registration
right after that module executes (or, where a module of this package was importing it, once that module has
executed). It changes nothing about how a module is found or loaded, and it leaves ``sys.meta_path`` once all three
have registered. Each registration is idempotent.

[`metashield_hf.hub.register`] registers everything eagerly.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["register_auto_config", "register_auto_model", "register_task", "register_when_imported", "TASK"]

TASK = "backdoor-detection"


def register_auto_config(configuration_auto: ModuleType | None = None) -> None:
    """``AutoConfig`` knows the ``metashield`` model type."""
    if configuration_auto is None:
        from transformers.models.auto import configuration_auto
    from .configuration_metashield import MetaShieldConfig

    try:
        configuration_auto.AutoConfig.register("metashield", MetaShieldConfig)
    except ValueError:  # already registered (module re-imported)
        pass


def register_auto_model(modeling_auto: ModuleType | None = None) -> None:
    """``AutoModel`` maps [`MetaShieldConfig`] to [`MetaShieldDetector`], and ``save_pretrained`` writes their
    ``auto_map``."""
    if modeling_auto is None:
        from transformers.models.auto import modeling_auto
    from .configuration_metashield import MetaShieldConfig
    from .modeling_metashield import MetaShieldDetector

    register_auto_config()
    try:
        modeling_auto.AutoModel.register(MetaShieldConfig, MetaShieldDetector)
    except ValueError:  # already registered
        pass
    MetaShieldConfig.register_for_auto_class()
    MetaShieldDetector.register_for_auto_class("AutoModel")


def register_task(pipelines: ModuleType | None = None) -> None:
    """The ``backdoor-detection`` task, whose default model is the detector shipped in the package (so it resolves
    offline)."""
    if pipelines is None:
        from transformers import pipelines
    from transformers.models.auto.modeling_auto import AutoModel

    from .loading import DEFAULT_DETECTOR_DIR
    from .pipeline_backdoor_detection import BackdoorDetectionPipeline

    register_auto_model()
    pipelines.PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=BackdoorDetectionPipeline,
        pt_model=AutoModel,
        default={"model": (str(DEFAULT_DETECTOR_DIR), None)},
        type="multimodal",
    )


#: The transformers module whose loading each registration waits for.
WATCHED: dict[str, Callable[[ModuleType], None]] = {
    "transformers.models.auto.configuration_auto": register_auto_config,
    "transformers.models.auto.modeling_auto": register_auto_model,
    "transformers.pipelines": register_task,
}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched transformers module, and for every module of this package, it asks the
    finders after it for the spec and wraps that loader's ``exec_module``.

    A registration waits until its transformers module has executed and no module of this package is half-executed:
    its imports of this package (the pipeline imports ``shield``, which imports most of it) would otherwise meet a
    partially initialized module when it is one of them whose import loaded transformers' registry.
    """

    def __init__(self, pending: dict[str, Callable[[ModuleType], None]]):
        self.pending = dict(pending)
        self.ready: list[tuple[Callable[[ModuleType], None], ModuleType]] = []
        self.depth = 0  # modules of this package executing right now

    def find_spec(self, name, path, target=None):
        own = name.startswith(f"{__package__}.")
        if not own and name not in self.pending:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            self.depth += own
            try:
                exec_module(module)
            finally:
                self.depth -= own
            if name in self.pending:
                self.ready.append((self.pending.pop(name), module))
            self.run_ready()

        spec.loader.exec_module = exec_then_register  # this spec's own loader instance, made for this import
        return spec

    def run_ready(self) -> None:
        while self.ready and not self.depth:
            action, module = self.ready.pop(0)
            action(module)
        if not self.pending and not self.ready and self in sys.meta_path:
            sys.meta_path.remove(self)


def register_when_imported() -> None:
    """Register with every transformers registry already imported, and with each other one as soon as it is."""
    pending = {}
    for name, action in WATCHED.items():
        if name in sys.modules:
            action(sys.modules[name])
        else:
            pending[name] = action
    if pending and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(pending))
