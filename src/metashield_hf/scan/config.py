"""[`ScanConfig`]: every option of the model-level scan, in one place.

[`scan_model`], [`scan_adapter`], the FL screen ([`metashield_hf.fl.score_client_updates`]) and the CLI's
``metashield scan`` (whose flags are built from these fields) all read their settings from a [`ScanConfig`].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .head import ScanHead

#: The fewest clean samples a scan accepts (10-50 recommended).
MIN_SCAN_SAMPLES = 5
#: Adam steps of the blend synthesis that runs by default on image models. The head's ``image/blend`` part is fit on
#: scans of this budget, so another budget gives blend sizes it does not expect.
DEFAULT_BLEND_STEPS = 20
#: Image inputs whose longer side passes this many pixels are synthesized on the clean samples downsized to it (a
#: forward pass costs about the pixel count, and a synthesis is thousands of them); the triggers found are upsampled
#: and the outputs recomputed at the model's own size. The zoos the scan head is fit on are at most 32 px, so their
#: scans never downsize. ``synthesize_triggers(max_side=0)`` keeps the model's own size.
MAX_SYNTHESIS_SIDE = 64
#: The source-specific synthesis (``source_steps``): a class's mask counts as effective once it flips half of the
#: clean samples, and its loss is averaged over the half it flips most easily, so the mask can settle on a trigger that
#: flips only some classes' inputs (TaCT) instead of growing to flip them all.
SOURCE_FLIP_THRESHOLD = 0.5
SOURCE_LOSS_QUANTILE = 0.5


@dataclass
class ScanConfig:
    """Options of the model-level scan ([`scan_model`]).

    The shipped scan head is fit on scans with these defaults: another synthesis budget gives trigger sizes it does not
    expect (see ``benchmarks/scan/README.md`` for what each budget costs and buys).

    Example:
        ```python
        >>> from metashield_hf.scan import ScanConfig, scan_model
        >>> report = scan_model("path/to/checkpoint", clean_images[:20], config=ScanConfig(source_steps=80))
        ```
    """

    n: int | None = field(default=None, metadata={"help": "Use at most this many clean samples."})
    steps: int = field(default=80, metadata={"help": "Adam steps of the per-class mask synthesis."})
    lr: float = field(default=0.3, metadata={"help": "Learning rate of the trigger synthesis."})
    flip_threshold: float = field(
        default=0.9, metadata={"help": "Fraction of clean samples a synthesized trigger must flip to count."}
    )
    class_batch: int = field(
        default=16, metadata={"help": "Classes optimised in one batch (memory: class_batch * n rows per pass)."}
    )
    refine: int | None = field(
        default=None,
        metadata={
            "help": "Screen and refine: every class gets screen_steps steps, then only this many classes with the "
            "smallest triggers continue to steps (None: every class runs the full budget)."
        },
    )
    screen_steps: int = field(default=40, metadata={"help": "Steps of the screen when refine is set."})
    adapt_steps: int | None = field(
        default=None,
        metadata={"help": "Inner-loop steps adapting the detector to the model (None: the detector's own)."},
    )
    use_detector: bool = field(
        default=True, metadata={"help": "Score the synthesized inputs with the adapted input-level detector."}
    )
    token_search: bool = field(
        default=True, metadata={"help": "Text models: search the vocabulary for short token triggers."}
    )
    synthesis: bool | None = field(
        default=None,
        metadata={
            "help": "Run the continuous trigger synthesis (None: where the head reads its signals, i.e. always for "
            "images, for text only if the head's text part weighs a synthesis signal)."
        },
    )
    blend_steps: int | None = field(
        default=None,
        metadata={
            "help": "Image models: steps of the whole-input blend synthesis (None: "
            f"{DEFAULT_BLEND_STEPS} on image models, none on others; 0: off)."
        },
    )
    source_steps: int = field(
        default=0,
        metadata={
            "help": "Image models: steps of the source-specific synthesis, a mask that flips the easiest half of the "
            "clean samples (TaCT-like triggers; 0: off)."
        },
    )
    max_margin_steps: int = field(
        default=20,
        metadata={
            "help": "Gradient-ascent steps of the per-class maximum-margin statistic (MM-BD, trigger-agnostic; "
            "recorded in the report; a scan with it is scored by the shipped head's image/agnostic part, which "
            "weighs the dormancy; 0: off, and the scan is scored by the blend part)."
        },
    )
    max_margin_starts: int = field(
        default=4, metadata={"help": "Random starts per class of the maximum-margin statistic."}
    )
    feature_steps: int = field(
        default=0,
        metadata={
            "help": "Adam steps of the per-class trigger inversion in feature space (a shift of an intermediate "
            "block's output; trigger-agnostic; recorded in the report, not read by the shipped head; 0: off)."
        },
    )
    feature_depth: float = field(
        default=0.5,
        metadata={
            "help": "Which block the feature inversion shifts, as a fraction of the way through the model's layer "
            "blocks (0: the first, 1: the last)."
        },
    )
    dormancy: bool = field(
        default=True,
        metadata={
            "help": "Compute the dormant shortcut weights per class (the head's class-specific weight on features the "
            "clean samples leave quiet; trigger-agnostic, no optimisation; the shipped head's image/agnostic part "
            "weighs its dormant_log_z; off: the scan is scored by the blend part)."
        },
    )
    head: Any = field(
        default=None,
        metadata={"help": "The model-level ScanHead or its JSON path (None: the shipped one)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds the synthesis and the detector; same seed, same report."})
    batch_size: int = field(default=32, metadata={"help": "Batch size of the clean forward pass."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run a checkpoint's own modelling code (only for code you trust)."}
    )
    allow_pickle: bool = field(
        default=False, metadata={"help": "Load pickle-only checkpoints (only for files you trust)."}
    )
    device: str | None = field(
        default=None,
        metadata={
            "help": "Where the model runs: cpu, cuda, cuda:N, mps or xpu (None: cuda when CUDA is present, else cpu, "
            "for a checkpoint named by path or Hub id; a model object stays where it is)."
        },
    )
    progress: bool | None = field(
        default=None,
        metadata={
            "help": "Progress bars on stderr naming each stage (synthesis per class, token search, detector); "
            "None: only when stderr is a terminal, so logs and tests stay quiet."
        },
    )

    def __post_init__(self) -> None:
        for name in ("steps", "screen_steps", "class_batch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.blend_steps is not None and self.blend_steps < 0:
            raise ValueError(f"blend_steps must be >= 0, got {self.blend_steps}")
        for name in ("source_steps", "max_margin_steps", "feature_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.max_margin_starts < 1:
            raise ValueError(f"max_margin_starts must be >= 1, got {self.max_margin_starts}")
        if not 0.0 <= self.feature_depth <= 1.0:
            raise ValueError(
                f"feature_depth must be in [0, 1] (0: the first block, 1: the last), got {self.feature_depth}"
            )

    def replace(self, **changes: Any) -> ScanConfig:
        """A copy with ``changes``; an unknown name raises a ``TypeError`` that lists the fields."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown scan options {unknown}; ScanConfig has {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def load_head(self) -> ScanHead:
        """The [`ScanHead`] this config names (the shipped one when ``head`` is None)."""
        from .head import ScanHead

        return self.head if isinstance(self.head, ScanHead) else ScanHead.load(self.head)
