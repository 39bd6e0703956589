"""Probe ``parameter_amplification``: how much of an input's prediction survives amplified model parameters.

IBD-PSC ([Hou et al., ICML 2024, "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling
Consistency"](https://arxiv.org/abs/2405.09786)): scaling up the affine parameters of a model's last normalisation
layers by ``ω`` makes benign predictions collapse, while a triggered input's prediction, carried by the backdoor's
over-strong features, survives. The number of amplified layers is chosen on the clean samples: the smallest depth at
which at least ``ξ`` of them change prediction; the ``n`` models amplified at that depth and the next ones each
score the input by the softmax probability of its original class, and the PSC is the mean over them.

Normalisation layers are ``BatchNorm``, ``LayerNorm`` and ``GroupNorm`` with affine parameters (the head and what
contains it excluded); a model with none falls back to its weight layers (``Linear`` / ``Conv``), and says so once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..targets.base import TargetOutput, model_name
from .base import PROBES, Probe, eval_mode

logger = logging.getLogger(__name__)

__all__ = ["ParameterAmplification", "amplified", "amplifiable_layers"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_warned: set[str] = set()


def amplifiable_layers(model: nn.Module, head: nn.Module | None = None) -> tuple[list[nn.Module], str]:
    """The layers whose parameters amplification scales, input to output, and which kind they are.

    Returns:
        ``(layers, "normalisation")`` for the affine normalisation layers, or ``(layers, "weight")`` for the
        ``Linear`` / ``Conv`` layers of a model that has none (the head excluded in both cases); ``([], "none")``
        when neither exists.
    """
    skip = {id(m) for m in head.modules()} if head is not None else set()
    norms = [
        m
        for m in model.modules()
        if isinstance(m, _NORMS) and id(m) not in skip and getattr(m, "weight", None) is not None
    ]
    if norms:
        return norms, "normalisation"
    weights = [m for m in model.modules() if isinstance(m, _WEIGHTS) and id(m) not in skip]
    if weights:
        name = model_name(model)
        if name not in _warned:
            _warned.add(name)
            logger.warning(
                "%s has no affine normalisation layers; parameter amplification scales its last weight layers instead",
                name,
            )
        return weights, "weight"
    return [], "none"


@contextmanager
def amplified(layers: list[nn.Module], factor: float) -> Iterator[None]:
    """Multiply the weight and bias of ``layers`` by ``factor`` inside the block; restore them exactly afterwards."""
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                for p in (m.weight, getattr(m, "bias", None)):
                    if isinstance(p, torch.Tensor):
                        saved.append((p, p.detach().clone()))
                        p.mul_(factor)
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@PROBES.register("parameter_amplification")
class ParameterAmplification(Probe):
    """IBD-PSC's parameter-oriented scaling consistency, one amplified model per extra forward pass.

    Statistics: ``psc`` (mean probability of the original class over the amplified models) and ``kept`` (the
    fraction of them that keep the original argmax).

    Args:
        passes: amplified models (the paper's ``n = 5``).
        factor: the scaling ``ω`` (the paper's 1.5).
        flip_rate: ``ξ``, the fraction of clean samples whose prediction the first chosen depth must change (0.6).
    """

    name = "parameter_amplification"
    names = ("psc", "kept")
    default_passes = 5

    def __init__(self, *, passes: int | None = None, seed: int = 0, factor: float = 1.5, flip_rate: float = 0.6):
        super().__init__(passes=passes, seed=seed)
        if factor <= 1.0:
            raise ValueError(f"factor must be > 1 (amplification), got {factor}")
        if not 0.0 < flip_rate <= 1.0:
            raise ValueError(f"flip_rate must lie in (0, 1], got {flip_rate}")
        self.factor, self.flip_rate = factor, flip_rate

    def _models(self) -> list[list[nn.Module]]:
        return [self.layers[len(self.layers) - d :] for d in self.depths]

    def _statistics(self, items: list, out: TargetOutput, exclude=None) -> np.ndarray:
        pred = out.logits.argmax(1)
        psc, kept = [], []
        with eval_mode(self.adapter.model):
            for layers in self._models():
                with amplified(layers, self.factor):
                    logits = self.run(items, f"inputs under parameters amplified x{self.factor}").logits
                p = logits.double().softmax(1)
                psc.append(p.gather(1, pred[:, None])[:, 0])
                kept.append((logits.argmax(1) == pred).double())
        return torch.stack([torch.stack(psc).mean(0), torch.stack(kept).mean(0)], 1).numpy()

    def _fit(self, support_items: list, support_out: TargetOutput) -> None:
        head = self.adapter._find_head().module
        self.layers, self.kind = amplifiable_layers(self.adapter.model, head)
        if not self.layers:
            raise ValueError(f"{model_name(self.adapter.model)} has no layer whose parameters can be amplified")
        pred = support_out.logits.argmax(1)
        start = len(self.layers)
        with eval_mode(self.adapter.model):
            for depth in range(1, len(self.layers) + 1):  # the smallest depth that flips >= xi of the clean samples
                with amplified(self.layers[-depth:], self.factor):
                    flips = (self.run(support_items, "the clean samples under amplified parameters").logits.argmax(1)
                             != pred).double().mean()  # fmt: skip
                if float(flips) >= self.flip_rate:
                    start = depth
                    break
        last = len(self.layers)
        first = max(1, min(start, last - self.passes + 1))
        self.depths = list(range(first, min(first + self.passes, last + 1)))
