"""Target adapters: the only domain-specific code on the detection path.

CONTRACT (other modules rely on it; keep it stable):

- ``TargetOutput``: what one adapter call returns for a batch of N inputs.
- ``TargetAdapter``: base class; one subclass per model family, registered in ``TARGETS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TargetOutput:
    """Activations of a target classifier for a batch.

    Attributes:
        logits: ``(N, C)`` float32 CPU tensor, the classifier's logits.
        penultimate: ``(N, D)`` float32 CPU tensor, the input of the final classification ``nn.Linear``
            (so ``head(penultimate) == logits``).
    """

    logits: torch.Tensor
    penultimate: torch.Tensor

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, index) -> TargetOutput:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TargetOutput(self.logits[index], self.penultimate[index])

    @classmethod
    def cat(cls, outputs: list[TargetOutput]) -> TargetOutput:
        return cls(torch.cat([o.logits for o in outputs]), torch.cat([o.penultimate for o in outputs]))
