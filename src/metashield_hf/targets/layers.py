"""Pooled activations of up to ``L`` evenly spaced blocks of a classifier, in the same forward pass as the logits.

One rule per family chooses the blocks (:func:`block_modules`):

- **timm**: the modules timm itself lists as feature stages (``model.feature_info``: ``layer1..4``, ``stages.i``,
  ``blocks.i``);
- **transformers**: the layers of the longest ``nn.ModuleList`` of the base model (BERT's ``encoder.layer``,
  DistilBERT's ``transformer.layer``, ViT's ``encoder.layer``, ResNet/ConvNeXt's ``encoder.stages``);
- **plain torch**: the top-level children that own parameters, a ``Sequential`` / ``ModuleList`` among them replaced
  by its own parameter-owning layers, the head and the modules that contain it left out (descending through a lone
  wrapper such as one ``nn.Sequential``).

Each block's output is pooled to ``(B, width)`` (:func:`pool_activation`): a conv map ``(B, C, H, W)`` by its global
average, a token sequence ``(B, T, H)`` by the mean over non-padding tokens, a vector as it is. The layer trajectory
of TED (Mo et al., S&P 2024) is read from these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["LayerCapture", "block_modules", "capture_layers", "evenly_spaced", "pool_activation"]


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _contains(module: nn.Module, target: nn.Module | None) -> bool:
    return target is not None and any(m is target for m in module.modules())


def _timm_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not info:
        return []
    modules = dict(model.named_modules())
    return [(f["module"], modules[f["module"]]) for f in info if isinstance(f, dict) and f.get("module") in modules]


def _transformers_blocks(model: nn.Module, head: nn.Module | None) -> list[tuple[str, nn.Module]]:
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 1 and not _contains(m, head) and all(map(_owns_parameters, m))
    ]
    if not lists:
        return []
    name, best = max(lists, key=lambda nm: len(nm[1]))  # the first of the longest: the encoder's layers
    return [(f"{name}.{i}", m) for i, m in enumerate(best)]


def _plain_blocks(model: nn.Module, head: nn.Module | None) -> list[tuple[str, nn.Module]]:
    prefix, module = "", model
    while True:
        kids = [(f"{prefix}{n}", m) for n, m in module.named_children() if _owns_parameters(m) and m is not head]
        if len(kids) == 1 and list(kids[0][1].children()):  # a lone wrapper (one Sequential): look inside it
            prefix, module = kids[0][0] + ".", kids[0][1]
            continue
        break
    blocks = []
    for name, m in kids:
        if _contains(m, head):
            continue
        if isinstance(m, (nn.Sequential, nn.ModuleList)):  # a container's own layers: conv, conv, conv, …
            blocks += [(f"{name}.{n}", c) for n, c in m.named_children() if _owns_parameters(c)]
        else:
            blocks.append((name, m))
    return blocks


def block_modules(model: nn.Module, head: nn.Module | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every candidate block of ``model``, input to output, by the family's rule.

    Args:
        model: the classifier (a PEFT wrapper is looked through).
        head: the classification head, never a block (nor a module that contains it).

    Returns:
        The candidate blocks; empty when the model has none (then there is no trajectory).
    """
    from .transformers_models import is_transformers_model, unwrap

    base = unwrap(model)
    blocks = _timm_blocks(base)
    if not blocks and is_transformers_model(base):
        blocks = _transformers_blocks(base, head)
    if not blocks:
        blocks = _plain_blocks(base, head)
    return [(n, m) for n, m in blocks if m is not head]


def evenly_spaced(n: int, count: int) -> list[int]:
    """``count`` indices of ``range(n)`` spread evenly, always with the last (``[]`` when ``count`` or ``n`` is 0)."""
    if n <= 0 or count <= 0:
        return []
    if count >= n:
        return list(range(n))
    if count == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, torch.Tensor) else None


def pool_activation(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One block's output → ``(B, width)`` float32.

    ``(B, C, H, W)`` → global average over ``H, W``; ``(B, T, H)`` → mean over the tokens where ``mask`` (``(B, T)``,
    the attention mask) is set, over all tokens without one; ``(B, D)`` as it is; anything else flattened.
    """
    x = x.detach().float()
    if x.dim() == 4:
        return x.mean((2, 3))
    if x.dim() == 3:
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            w = mask.to(device=x.device, dtype=x.dtype)[..., None]
            return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return x.mean(1)
    return x.reshape(x.shape[0], -1)


@dataclass
class LayerCapture:
    """What :func:`capture_layers` recorded in one forward pass: one pooled ``(B, width)`` tensor per block."""

    names: list[str]
    pooled: dict[int, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None

    def layers(self) -> tuple[torch.Tensor, ...]:
        """The pooled activations, input to output (float32, on the CPU)."""
        missing = [self.names[i] for i in range(len(self.names)) if i not in self.pooled]
        if missing:
            raise RuntimeError(f"blocks {missing} did not run in the forward pass; nothing was captured for them")
        return tuple(self.pooled[i].cpu() for i in range(len(self.names)))


@contextmanager
def capture_layers(blocks: list[tuple[str, nn.Module]], mask: torch.Tensor | None = None) -> Iterator[LayerCapture]:
    """Hook ``blocks`` and pool each one's output (its last call) while the model runs inside the ``with`` block.

    Args:
        blocks: ``(name, module)`` pairs, e.g. an evenly spaced subset of :func:`block_modules`.
        mask: the batch's attention mask ``(B, T)``, used to pool token sequences over real tokens only.

    Returns:
        A context manager yielding a [`LayerCapture`]; the hooks are removed in ``finally``, also on errors.
    """
    holder = LayerCapture([n for n, _ in blocks], mask=mask)
    handles = []

    def make_hook(i: int):
        def hook(_module, _args, output):
            x = _first_tensor(output)
            if x is not None and x.dim() >= 2:
                holder.pooled[i] = pool_activation(x, holder.mask)

        return hook

    try:
        for i, (_, module) in enumerate(blocks):
            handles.append(module.register_forward_hook(make_hook(i)))
        yield holder
    finally:
        for h in handles:
            h.remove()
