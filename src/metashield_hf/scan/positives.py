"""Synthesized positives: the target's outputs on clean samples carrying a trigger synthesized for this model.

The input-level detector's inner loop needs positives. Deployment never has a triggered example, so the generic
fallback is pseudo-anomalies in activation space; but the scan already knows how to synthesize, from clean samples
alone, the trigger of each class, and the classes whose triggers are easiest to force are where a backdoor's target
hides. Their synthesized inputs are model-specific positives that no pseudo-anomaly can be.

One synthesis code path serves the scan and adaptation: [`synthesized_positives`] runs [`run_synthesis`] with a
[`ScanConfig`]'s budget, and [`positives_from_report`] reuses what a scan already synthesized, so a user who scanned a
checkpoint does not pay for the synthesis twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..targets.base import TargetAdapter, TargetOutput
from .config import ScanConfig

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_SYNTHESIZED_MODALITIES",
    "POSITIVES",
    "SynthesizedPositives",
    "model_fingerprint",
    "positives_for",
    "positives_from_report",
    "synthesized_positives",
]

#: What ``adapt(..., positives=)`` accepts: generic pseudo-anomalies, the synthesized triggers' outputs, or ``auto``
#: (synthesized for image and tensor models, pseudo for text, whose synthesis runs in embedding space:
#: see [`positives_for`]).
POSITIVES = ("pseudo", "synthesized", "auto")
#: Modalities whose synthesized triggers ``auto`` uses (the continuous synthesis acts on their real input space).
AUTO_SYNTHESIZED_MODALITIES = ("image", "tensor")
#: Classes whose synthesized inputs become positives (the most anomalous, i.e. easiest to force, first).
DEFAULT_POSITIVE_CLASSES = 1


@dataclass
class SynthesizedPositives:
    """What the synthesis gave the inner loop.

    Attributes:
        outputs: the target's outputs on the clean samples with the chosen classes' triggers, or ``None`` when the
            synthesis reached no class (the inner loop then falls back to pseudo-anomalies).
        classes: the classes whose triggers were used, most anomalous first.
        source: ``"synthesis"`` (run here), ``"scan_report"`` (a scan's mask synthesis reused) or ``"token_triggers"``
            (a text scan's token triggers inserted into the clean samples).
        reason: why ``outputs`` is ``None`` (empty otherwise).
        seconds: what producing them cost.
        mask: the first class's synthesized mask in the model's input space (``(1, *mask_shape[1:])``), where the
            synthesis ran there (pixels, tensors); ``None`` for embeddings and token triggers. What the erase check
            ([`EraseCheck`]) blanks out.
    """

    outputs: TargetOutput | None
    classes: list[int]
    source: str
    reason: str = ""
    seconds: float = 0.0
    mask: torch.Tensor | None = None


def positives_for(positives: str, modality: str) -> str:
    """Resolve ``positives`` for a target of ``modality``: ``auto`` is ``synthesized`` for image and tensor models
    and ``pseudo`` for text (an embedding-space trigger is not a text a user could type)."""
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    if positives != "auto":
        return positives
    return "synthesized" if modality in AUTO_SYNTHESIZED_MODALITIES else "pseudo"


def model_fingerprint(model) -> str:
    """A short hash of a model's parameters (names, shapes and values): what ties a scan report to the model it
    scanned. Accepts a target adapter or a ``torch.nn.Module``."""
    module = model.model if isinstance(model, TargetAdapter) else model
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.named_parameters():
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _choose(anomaly: np.ndarray | None, reached: np.ndarray, n_classes: int) -> list[int]:
    """The reached classes by decreasing anomaly index (easiest to force first), at most ``n_classes``."""
    if anomaly is None:
        return []
    order = np.argsort(-np.nan_to_num(np.asarray(anomaly, dtype=np.float64), nan=-np.inf), kind="stable")
    return [int(c) for c in order if bool(reached[c])][:n_classes]


def _input_mask(result, classes: list[int]) -> torch.Tensor | None:
    """The first class's mask where the synthesis ran in the model's input space (not in embeddings)."""
    if result.kind not in ("pixels", "tensor") or not classes:
        return None
    return result.masks[classes[0]][None].detach().float().cpu()


def _stack(logits: torch.Tensor, penultimate: torch.Tensor, classes: list[int]) -> TargetOutput:
    idx = torch.as_tensor(classes)
    return TargetOutput(logits[idx].flatten(0, 1).detach().float(), penultimate[idx].flatten(0, 1).detach().float())


def synthesized_positives(
    adapter: TargetAdapter,
    items: list,
    clean_out: TargetOutput | None = None,
    *,
    config: ScanConfig | None = None,
    n_classes: int = DEFAULT_POSITIVE_CLASSES,
    seed: int = 0,
) -> SynthesizedPositives:
    """Synthesize each class's trigger on the clean ``items`` (the scan's mask synthesis with ``config``'s budget) and
    return the outputs of the ``n_classes`` easiest-to-force classes' triggered samples.

    Args:
        adapter: the target.
        items: the clean samples as the adapter's items.
        clean_out: the target's outputs on ``items`` (not recomputed when given).
        config: the synthesis budget (``steps``, ``lr``, ``flip_threshold``, ``class_batch``, ``refine``,
            ``screen_steps``); default: ``ScanConfig()``, the scan's own.
        n_classes: how many classes' synthesized inputs to return.
        seed: seeds the synthesis.
    """
    from .scanner import run_synthesis

    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    config = config or ScanConfig()
    t0 = time.perf_counter()
    if clean_out is not None and clean_out.logits.shape[1] < 2:
        return SynthesizedPositives(None, [], "synthesis", "the model has fewer than 2 classes")
    _, result, anomaly = run_synthesis(
        adapter, items, steps=config.steps, lr=config.lr, flip_threshold=config.flip_threshold,
        class_batch=config.class_batch, seed=seed, refine=config.refine, screen_steps=config.screen_steps,
        clean_out=clean_out, progress=config.progress,
    )  # fmt: skip
    classes = _choose(anomaly, result.reached, n_classes)
    if not classes:
        reason = f"no class's synthesized trigger flipped {config.flip_threshold:.0%} of the clean samples"
        return SynthesizedPositives(None, [], "synthesis", reason, time.perf_counter() - t0)
    out = _stack(result.logits, result.penultimate, classes)
    return SynthesizedPositives(out, classes, "synthesis", "", time.perf_counter() - t0, _input_mask(result, classes))


def positives_from_report(
    report,
    adapter: TargetAdapter,
    items: list,
    *,
    n_classes: int = DEFAULT_POSITIVE_CLASSES,
    seed: int = 0,
) -> SynthesizedPositives:
    """The positives a scan already synthesized, for the same model.

    A report whose mask synthesis ran gives its perturbed samples' outputs (on the scan's clean samples); a text scan
    gives its token triggers, inserted into ``items`` (one forward pass), in preference to its embedding-space
    synthesis, whose points no tokenized text reaches.

    Raises:
        ValueError: the report was made on another model (its fingerprint differs), or carries no fingerprint.
    """
    t0 = time.perf_counter()
    fingerprint = getattr(report, "fingerprint", None)
    if not fingerprint:
        raise ValueError("this scan report carries no model fingerprint; rerun scan_model to hand it to adapt")
    if fingerprint != model_fingerprint(adapter):
        raise ValueError(
            f"the scan report is of another model ({report.checkpoint}, fingerprint {fingerprint}); "
            "scan this model, or adapt without scan_report"
        )
    anomaly = np.array([np.nan if e.anomaly_index is None else e.anomaly_index for e in report.per_class])
    result = report.synthesis
    has_tokens = any(e.token_trigger for e in report.per_class)
    if result is not None and not (adapter.modality == "text" and has_tokens):  # text: real tokens over embeddings
        classes = _choose(anomaly, result.reached, n_classes)
        if not classes:
            return SynthesizedPositives(None, [], "scan_report", "the scan's synthesis reached no class")
        out = _stack(result.logits, result.penultimate, classes)
        return SynthesizedPositives(
            out, classes, "scan_report", "", time.perf_counter() - t0, _input_mask(result, classes)
        )
    # a text scan's token triggers: its suspected target first, then the classes whose token triggers flip the most
    flips = np.array([(e.token_flip_rates or [0.0])[-1] for e in report.per_class])
    order = [report.suspected_target] + [int(c) for c in np.argsort(-flips, kind="stable")]
    classes = list(dict.fromkeys(c for c in order if report.per_class[c].token_trigger))[:n_classes]
    if adapter.modality != "text" or not classes:
        return SynthesizedPositives(None, [], "token_triggers", "the scan report has no synthesized trigger")
    rng = np.random.default_rng(seed)
    texts = []
    for c in classes:
        for text in items:
            words = str(text).split()
            words.insert(int(rng.integers(len(words) + 1)), report.per_class[c].token_trigger)
            texts.append(" ".join(words))
    with torch.no_grad():
        out = adapter(texts)
    return SynthesizedPositives(
        TargetOutput(out.logits.float(), out.penultimate.float()), classes, "token_triggers", "",
        time.perf_counter() - t0,
    )  # fmt: skip
