"""Progress and cost reporting of the scan: the tqdm bars' on/off rule and the cost estimate logged before a scan.

Every long stage (the per-class synthesis, the token search, the detector) shows a tqdm bar on stderr named after the
stage; ``progress=None`` (the default of [`ScanConfig`]) leaves the choice to tqdm, which shows a bar only when stderr
is a terminal, so logs, tests and benchmarks stay quiet.
"""

from __future__ import annotations

import logging

from .config import DEFAULT_BLEND_STEPS, MAX_SYNTHESIS_SIDE, ScanConfig

logger = logging.getLogger(__name__)

__all__ = ["LONG_SCAN_S", "log_scan_cost", "tqdm_disable"]

#: A scan whose estimated cost passes this many seconds announces it at INFO (shorter ones at DEBUG).
LONG_SCAN_S = 30.0


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` option: ``None`` lets tqdm show the bar only on a terminal."""
    return None if progress is None else not progress


def log_scan_cost(
    name: str,
    modality: str,
    config: ScanConfig,
    num_classes: int,
    n: int,
    forward_s: float,
    tokens: bool,
    input_side: int | None = None,
) -> None:
    """Log what the synthesis is about to cost, and the options that cut it, before it starts.

    The unit is one clean sample through the model and back (a synthesis step runs every sample once per class); the
    seconds scale the timed clean forward pass by 3 for the backward pass, so they are a rough figure (a first forward
    pass pays one-off setup, batching differs). Images whose longer side ``input_side`` passes `MAX_SYNTHESIS_SIDE`
    are synthesized downsized, so their seconds scale with the smaller area (where the model refuses the smaller size
    the synthesis keeps the full one, and the figure is low)."""
    if config.refine is not None and config.screen_steps < config.steps:
        steps = num_classes * config.screen_steps + min(config.refine, num_classes - 1) * (
            config.steps - config.screen_steps
        )
    else:
        steps = num_classes * config.steps
    image = modality == "image"  # the blend and source syntheses run on image models only
    blend = (DEFAULT_BLEND_STEPS if config.blend_steps is None else config.blend_steps) if image else 0
    extra = blend + (config.source_steps if image else 0)
    passes = n * (steps + num_classes * extra)
    seconds = 3.0 * forward_s / max(n, 1) * passes
    if modality == "image" and input_side and input_side > MAX_SYNTHESIS_SIDE:
        seconds *= (MAX_SYNTHESIS_SIDE / input_side) ** 2
    logger.log(
        logging.INFO if seconds >= LONG_SCAN_S else logging.DEBUG,
        "scan of %s: %d classes x %d steps x %d clean samples%s = %d sample passes, about %.0f s%s; cheaper: fewer "
        "steps (--steps, ScanConfig.steps), fewer samples (--n), screen and refine (--refine 2)%s",
        name,
        num_classes,
        config.steps,
        n,
        f" (+ {extra} blend/source steps per class)" if extra else "",
        passes,
        seconds,
        " before the token search" if tokens else "",
        ", no blend synthesis (--blend_steps 0)" if blend else "",
    )
