"""The live-probe registry, the probe base class and the helpers the probes share.

A probe reads evidence that one forward pass through the penultimate layer does not hold: the layer trajectory, or
the target's predictions on perturbed inputs or under perturbed parameters. It is fitted once per adaptation on the
clean support and then gives each input ``len(names)`` raw statistics (higher = more trigger-like), computed from at
most ``passes`` extra forward passes per input.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..registry import Registry
from ..targets.base import TargetAdapter, TargetOutput

logger = logging.getLogger(__name__)

__all__ = ["PROBES", "Probe", "ProbeError", "eval_mode", "prediction_entropy"]


class ProbeError(RuntimeError):
    """The target failed on what a probe sent it (the message names the probe and the perturbation)."""


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in ``eval()`` mode inside the block and give every submodule its own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``-Σ_c p_c log₂ p_c`` of each row's softmax, over the class axis (STRIP's entropy), float64."""
    p = logits.double().softmax(-1)
    return -(p * p.clamp_min(1e-300).log2()).sum(-1)


class Probe:
    """Base class of a live probe.

    A subclass sets ``names`` (its statistics, higher = more trigger-like), ``min_passes`` (the fewest extra forward
    passes per input it can work with; 0 for evidence from the ordinary pass) and implements ``_fit`` and
    ``_statistics``. ``_statistics(items, out, exclude)`` with ``exclude[i]`` set scores the support items themselves,
    leaving support item ``exclude[i]`` out where the probe draws on the support; a probe that computes those
    statistics while fitting anyway sets ``self._support`` in ``_fit``. ``passes`` is what it spends per input; the
    caller gives it a budget.

    Args:
        passes: extra forward passes per input (``None``: the probe's default).
        seed: seeds every random choice (overlays, masks).
    """

    name: ClassVar[str] = ""
    names: ClassVar[tuple[str, ...]] = ()
    min_passes: ClassVar[int] = 1
    default_passes: ClassVar[int] = 1
    needs_layers: ClassVar[bool] = False
    modalities: ClassVar[tuple[str, ...]] = ("image", "tensor", "text")

    def __init__(self, *, passes: int | None = None, seed: int = 0):
        passes = self.default_passes if passes is None else passes
        if not isinstance(passes, int) or passes < self.min_passes:
            raise ValueError(
                f"probe {self.name!r} needs at least {self.min_passes} extra forward passes per input, got {passes!r}"
            )
        self.passes = passes
        self.seed = seed
        self.adapter: TargetAdapter | None = None
        self.applies = True

    def fit(self, adapter: TargetAdapter, support_items: list, support_out: TargetOutput) -> Probe:
        """Fit on the prepared clean support items and the target's outputs on them (with ``layers`` when the probe
        reads the trajectory)."""
        self.adapter = adapter
        self.applies = adapter.modality in self.modalities
        self._support: np.ndarray | None = None
        self._support_inputs = (support_items, support_out)
        if self.applies:
            self._fit(support_items, support_out)
        return self

    def support_statistics(self) -> np.ndarray:
        """``(N, S)`` statistics of the clean support itself (leave-one-out where the probe uses the support),
        computed on first use."""
        if self.adapter is None:
            raise RuntimeError(f"probe {self.name!r} is not fitted")
        items, out = self._support_inputs
        if not self.applies:
            return np.zeros((len(items), len(self.names)))
        if self._support is None:
            self._support = self._statistics(items, out, exclude=list(range(len(items))))
        return self._support

    def statistics(self, items: list, out: TargetOutput) -> np.ndarray:
        """``(B, S)`` float64 statistics of prepared items whose ordinary outputs are ``out``."""
        if self.adapter is None:
            raise RuntimeError(f"probe {self.name!r} is not fitted: call fit(adapter, support_items, support_out)")
        if not self.applies:
            return np.zeros((len(items), len(self.names)))
        return self._statistics(items, out, exclude=None)

    def run(self, copies: list, what: str) -> TargetOutput:
        """The target on perturbed copies; an error of the target is re-raised naming this probe."""
        try:
            return self.adapter(copies)
        except Exception as e:  # noqa: BLE001 - re-raised with the probe's name
            raise ProbeError(f"probe {self.name!r}: the target failed on {what}: {type(e).__name__}: {e}") from e

    # ---- what subclasses provide ------------------------------------------------------------------------------------
    def _fit(self, support_items: list, support_out: TargetOutput) -> None:
        raise NotImplementedError

    def _statistics(self, items: list, out: TargetOutput, exclude: list[int] | None) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(passes={self.passes}, seed={self.seed})"


PROBES: Registry[type[Probe]] = Registry("probe")
