"""Probes that perturb the input through the target adapter: ``superimposition`` (STRIP) and ``input_amplification``
(SCALE-UP). What a perturbation means for a modality is the adapter's business (``TargetAdapter.perturb``).

- STRIP ([Gao et al. 2019](https://arxiv.org/abs/1902.06531)): a triggered input keeps its prediction when a clean
  input is superimposed on it, so its copies' predictions have low entropy (``-Σ_c p_c log₂ p_c`` over the class
  axis, per copy, averaged over copies, as the paper defines it). Overlays are the clean support inputs; a support
  input is never superimposed with itself.
- SCALE-UP ([Guo et al., ICLR 2023](https://arxiv.org/abs/2302.03251)): multiplying a triggered image's pixel values
  leaves its prediction unchanged far more often than a clean image's (scaled prediction consistency, SPC). Images and
  tensors only; for text the probe's statistics are constant (uninformative).
"""

from __future__ import annotations

import numpy as np
import torch

from ..targets.base import TargetOutput
from ..targets.perturb import TEXT_MODES
from .base import PROBES, Probe, eval_mode, prediction_entropy

__all__ = ["InputAmplification", "Superimposition"]


@PROBES.register("superimposition")
class Superimposition(Probe):
    """STRIP's superimposition: ``passes`` copies of each input, each with a clean support input superimposed.

    Statistics: ``neg_entropy`` (minus the mean per-copy prediction entropy, in bits) and ``kept`` (the fraction of
    copies that keep the original prediction).

    Args:
        passes: copies per input.
        alpha: weight of the overlay for images and tensors (STRIP's saturating sum uses 1).
        text_mix: for text, the probability per overlay word of being spliced in (or, with ``text_mode="replace"``,
            per input word of being replaced).
        text_mode: ``"splice"`` (overlay words inserted, no input word lost, so a trigger token survives) or
            ``"replace"`` (STRIP's word replacement); see `metashield_hf.targets.perturb`.
    """

    name = "superimposition"
    names = ("neg_entropy", "kept")
    min_passes = 2
    default_passes = 6

    def __init__(self, *, passes: int | None = None, seed: int = 0, alpha: float = 1.0, text_mix: float = 0.5,
                 text_mode: str = "splice"):  # fmt: skip
        super().__init__(passes=passes, seed=seed)
        if not 0.0 <= text_mix <= 1.0:
            raise ValueError(f"text_mix must lie in [0, 1], got {text_mix}")
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        self.alpha, self.text_mix, self.text_mode = alpha, text_mix, text_mode

    def _fit(self, support_items: list, support_out: TargetOutput) -> None:
        if len(support_items) < 2:
            raise ValueError(
                "superimposition needs at least 2 clean support inputs (a support input is never its own overlay)"
            )
        self.pool = support_items
        self.bounds = self.adapter.input_range(support_items)

    def _statistics(self, items: list, out: TargetOutput, exclude: list[int] | None) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        n = len(self.pool)
        copies = []
        for i, x in enumerate(items):
            if exclude is None:
                picks = rng.integers(n, size=self.passes)
            else:  # leave-one-out: draw among the other support inputs
                picks = rng.integers(n - 1, size=self.passes)
                picks = picks + (picks >= exclude[i])
            copies += [
                self.adapter.perturb(x, "superimpose", overlay=self.pool[j], rng=rng, bounds=self.bounds,
                                     alpha=self.alpha, text_mix=self.text_mix, text_mode=self.text_mode)
                for j in picks
            ]  # fmt: skip
        with eval_mode(self.adapter.model):
            logits = self.run(copies, "superimposed copies").logits
        ent = prediction_entropy(logits).reshape(len(items), self.passes).mean(1)
        kept = (logits.argmax(1).reshape(len(items), self.passes) == out.logits.argmax(1)[:, None]).double().mean(1)
        return torch.stack([-ent, kept], 1).numpy()


@PROBES.register("input_amplification")
class InputAmplification(Probe):
    """SCALE-UP's input amplification: the input's values multiplied by ``passes`` factors, clipped to the valid range.

    Statistics: ``spc`` (the fraction of amplified copies that keep the original prediction, the paper's scaled
    prediction consistency) and ``prob`` (the mean probability of the original class over them).

    Args:
        passes: amplified copies per input (the paper's 5).
        factors: the multipliers (default ``3, 5, 7, …``: the paper's odd factors from 3, one per pass).
    """

    name = "input_amplification"
    names = ("spc", "prob")
    default_passes = 5
    modalities = ("image", "tensor")

    def __init__(self, *, passes: int | None = None, seed: int = 0, factors: tuple[float, ...] | None = None):
        super().__init__(passes=passes, seed=seed)
        self.factors = tuple(factors) if factors is not None else tuple(3.0 + 2.0 * i for i in range(self.passes))
        if len(self.factors) != self.passes:
            raise ValueError(f"{len(self.factors)} factors for {self.passes} passes; give one factor per pass")
        if any(f <= 0 for f in self.factors):
            raise ValueError(f"factors must be > 0, got {self.factors}")

    def _fit(self, support_items: list, support_out: TargetOutput) -> None:
        self.bounds = self.adapter.input_range(support_items)

    def _statistics(self, items: list, out: TargetOutput, exclude) -> np.ndarray:
        copies = [
            self.adapter.perturb(x, "amplify", factor=f, bounds=self.bounds) for x in items for f in self.factors
        ]
        with eval_mode(self.adapter.model):
            logits = self.run(copies, "amplified inputs").logits
        pred = out.logits.argmax(1)
        p = logits.double().softmax(1).reshape(len(items), self.passes, -1)
        kept = (logits.argmax(1).reshape(len(items), self.passes) == pred[:, None]).double().mean(1)
        prob = p.gather(2, pred[:, None, None].expand(-1, self.passes, 1))[..., 0].mean(1)
        return torch.stack([kept, prob], 1).numpy()
