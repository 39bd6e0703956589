"""The erase check: does an input's prediction of the trigger's class survive when the synthesized trigger's region
is replaced by typical clean content?

The scan's mask synthesis finds, from clean samples alone, the smallest region that forces each class. For a
patch-like backdoor that region sits where the real trigger does, so blanking it out on a triggered input takes the
trigger away and the prediction falls back to the input's true class, while a clean input of the target class keeps
its prediction (its evidence is spread over the whole input). The check's score is that drop in the target class's
probability, ``p_t(x) - p_t(erase(x))``, clipped to ``[0, 1]``; one extra forward pass per input. Triggers spread over
the whole input (blending, warping, filters) give large masks whose erasure moves clean inputs too, which the shield
sees on its clean samples and then leaves the check off ([`EraseCheck.from_positives`]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..targets.base import TargetAdapter
from .synthesis import synthesis_space

__all__ = ["ERASE_FLIP_DROP", "EraseCheck"]

#: A drop in the target class's probability at least this large counts as a flip when the shield asks whether
#: erasing moves its clean samples (the gate of [`EraseCheck.from_positives`]).
ERASE_FLIP_DROP = 0.5


@dataclass
class EraseCheck:
    """Blank out a synthesized trigger's region and measure how much the target class's probability drops.

    Attributes:
        mask: ``(1, *mask_shape)`` the synthesized mask in the model's input space, values in ``[0, 1]``.
        fill: ``(1, *input_shape)`` what the erased region is filled with: the clean samples' mean input.
        target_class: the class the synthesized trigger forces.
        batch_size: inputs per forward pass.
    """

    mask: torch.Tensor
    fill: torch.Tensor
    target_class: int
    batch_size: int = 256

    @classmethod
    def from_positives(cls, adapter: TargetAdapter, items: list, positives) -> tuple[EraseCheck | None, str]:
        """The check for the first class of ``positives`` (a [`SynthesizedPositives`] with a ``mask``) and the clean
        ``items`` (prepared items of the adapter); ``(None, reason)`` when there is no input-space mask."""
        if positives is None or positives.mask is None or not positives.classes:
            return None, "no synthesized trigger in the model's input space"
        space = synthesis_space(adapter, items)
        if space.inputs is None:
            return None, f"the synthesis space ({space.kind}) is not the model's input space"
        fill = space.inputs.detach().float().mean(0, keepdim=True).cpu()
        mask = positives.mask.float()
        if mask.shape[1:] != space.mask_shape[1:]:
            return None, f"mask of shape {tuple(mask.shape[1:])} for inputs whose masks are {space.mask_shape[1:]}"
        return cls(mask, fill, int(positives.classes[0])), ""

    @torch.no_grad()
    def drops(self, adapter: TargetAdapter, items: list, logits: torch.Tensor | None = None) -> np.ndarray:
        """``p_t(x) - p_t(erase(x))`` clipped to ``[0, 1]`` for each prepared item: one forward pass per item on its
        erased copy, and one more when the target's ``logits`` on ``items`` are not given."""
        out = []
        for start in range(0, len(items), self.batch_size):
            space = synthesis_space(adapter, items[start : start + self.batch_size])
            if space.inputs is None:
                raise ValueError(f"the synthesis space ({space.kind}) is not the model's input space")
            n = space.num_samples
            mask = self.mask.to(space.device).expand(n, *self.mask.shape[1:])
            fill = self.fill.to(space.device).expand(n, *self.fill.shape[1:])
            if logits is None:
                before, _ = space.run(torch.zeros_like(mask), fill, 1)
            else:
                before = logits[start : start + n].to(space.device)
            after, _ = space.run(mask, fill, 1)
            t = self.target_class
            drop = before.float().softmax(-1)[:, t] - after.float().softmax(-1)[:, t]
            out.append(drop.clamp(0.0, 1.0).cpu().numpy())
        return np.concatenate(out) if out else np.empty(0)
