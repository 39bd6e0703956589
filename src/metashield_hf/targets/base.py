"""Target adapters: the only domain-specific code on the detection path.

CONTRACT (other modules rely on it; keep it stable):

- ``TargetOutput``: what one adapter call returns for a batch of N inputs.
- ``TargetAdapter``: base class; one subclass per model family, registered in ``TARGETS``.
- ``capture_penultimate`` / ``find_head``: the hook context manager and the head-finding rule (in ``heads.py``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..registry import Registry
from .heads import HeadInfo, call_model, capture_penultimate, find_head, locate_head
from .inputs import batched, iter_items
from .layers import block_modules, capture_layers, evenly_spaced
from .perturb import PERTURBATIONS, InputRange, amplify, augment, superimpose

logger = logging.getLogger(__name__)

__all__ = ["TARGETS", "TargetAdapter", "TargetOutput", "capture_penultimate", "find_head", "locate_head"]


@dataclass
class TargetOutput:
    """Activations of a target classifier for a batch.

    Attributes:
        logits: ``(N, C)`` float32 CPU tensor, the classifier's logits.
        penultimate: ``(N, D)`` float32 CPU tensor, the input of the final classification ``nn.Linear``
            (so ``head(penultimate) == logits``).
        layers: the pooled activations ``(N, width_l)`` of up to ``L`` evenly spaced blocks, input to output, when
            they were asked for (``adapter(inputs, layers=True)``); ``()`` otherwise.
    """

    logits: torch.Tensor
    penultimate: torch.Tensor
    layers: tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, index) -> TargetOutput:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TargetOutput(self.logits[index], self.penultimate[index], tuple(x[index] for x in self.layers))

    @classmethod
    def cat(cls, outputs: list[TargetOutput]) -> TargetOutput:
        depth = {len(o.layers) for o in outputs}
        if len(depth) > 1:
            raise ValueError(f"cannot concatenate outputs with different numbers of layers {sorted(depth)}")
        layers = tuple(torch.cat([o.layers[i] for o in outputs]) for i in range(depth.pop() if depth else 0))
        return cls(torch.cat([o.logits for o in outputs]), torch.cat([o.penultimate for o in outputs]), layers)


TARGETS: Registry[type[TargetAdapter]] = Registry("target")


def model_name(model: nn.Module) -> str:
    """A short name for messages: the class and, when known, the checkpoint or timm architecture it came from."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    timm_cfg = getattr(model, "pretrained_cfg", None)
    if not path and isinstance(timm_cfg, dict):
        path = timm_cfg.get("architecture")
    return f"{type(model).__name__}({path!r})" if path else type(model).__name__


def to_device(inputs, device: torch.device, dtype: torch.dtype | None):
    """Move a tensor or a dict of tensors to ``device``; floating-point tensors also take ``dtype`` when it is set."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    if isinstance(inputs, torch.Tensor):
        return move(inputs)
    return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


class TargetAdapter:
    """Base class of target adapters: raw inputs → model inputs → ``TargetOutput(logits, penultimate)``.

    A subclass sets ``name`` and ``modality``, implements ``accepts`` and ``preprocess``, and may provide
    ``example_inputs`` (a tiny batch for the head-finding dry run; without it the head is found on the first call).

    Args:
        model: the classifier; it is put in ``eval()`` mode (and moved to ``device`` when one is given).
        processor: tokenizer / image processor / transform, depending on the family.
        batch_size: inputs per forward pass.
        device: where the model runs; ``None`` keeps the model where it is.

    Example:
        ```python
        >>> adapter = load_target(model, tokenizer)
        >>> out = adapter(["a fine film", "a dull film"])
        >>> torch.allclose(adapter.head_logits(out.penultimate), out.logits, atol=1e-5)
        True
        ```
    """

    name: ClassVar[str] = ""
    modality: ClassVar[str] = "tensor"  # "text" | "image" | "tensor"
    max_layers: int = 8  # blocks of the layer trajectory (``adapter(inputs, layers=True)``)

    def __init__(
        self,
        model: nn.Module,
        processor=None,
        *,
        batch_size: int = 32,
        device: str | torch.device | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.processor = processor
        self.batch_size = batch_size
        if device is not None:
            model.to(device)
        param = next(iter(model.parameters()), None)
        self.device = torch.device(device) if device is not None else (param.device if param is not None else None)
        self.device = self.device or torch.device("cpu")
        self._dtype = param.dtype if param is not None and param.is_floating_point() else None
        self._head: HeadInfo | None = None
        self._blocks: tuple[int, list[tuple[str, nn.Module]]] | None = None  # (max_layers, chosen blocks)
        model.eval()

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating-point dtype of the model's parameters (what float inputs are cast to), or ``None``."""
        return self._dtype

    # ---- what subclasses provide -------------------------------------------------------------------------------
    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether this adapter can handle ``model``."""
        raise NotImplementedError

    def preprocess(self, items: list) -> dict[str, torch.Tensor] | torch.Tensor:
        """One batch of raw items → model inputs (a dict of keyword tensors, or one tensor)."""
        raise NotImplementedError

    def iter_items(self, inputs) -> Iterator:
        """Split ``inputs`` into raw items (one item, a list, a batch tensor, a dataset or a column)."""
        return iter_items(inputs, self.modality, model_name(self.model))

    def example_inputs(self) -> dict[str, torch.Tensor] | torch.Tensor | None:
        """A tiny batch for the head-finding dry run, or ``None`` to find the head on the first call."""
        return None

    def expected_num_classes(self) -> int | None:
        """``config.num_labels`` / ``model.num_classes`` where the family has one; ``None`` = from the logits."""
        return None

    def forward(self, model_inputs) -> torch.Tensor:
        """Run the model on prepared inputs and return its logits."""
        return call_model(self.model, model_inputs)

    # ---- input perturbations (the live probes' only view of the domain) ----------------------------------------
    def prepare_items(self, inputs) -> list:
        """Raw inputs → the items perturbations work on: ``str`` for text, float ``(C, H, W)`` in ``[0, 1]`` for
        images (the adapter accepts these back), float tensors for plain torch models."""
        from .inputs import to_chw_float

        items = list(self.iter_items(inputs))
        if self.modality == "text":
            return items
        if self.modality == "image":
            channels = getattr(getattr(self, "inner", self), "channels", None)  # PeftAdapter: its family adapter
            return [to_chw_float(x, channels, model_name(self.model)) for x in items]
        return [torch.as_tensor(x).float() for x in items]

    def input_range(self, prepared: list) -> InputRange:
        """What perturbed copies are clipped to: ``[0, 1]`` for images, the range of ``prepared`` for tensors."""
        return InputRange.of(prepared) if self.modality == "tensor" else InputRange()

    def perturb(self, item, kind: str, *, overlay=None, factor: float = 1.0, rng=None, bounds=None, **options):
        """One perturbed copy of a prepared item (see [`prepare_items`]), as this adapter's modality defines it.

        Args:
            item: a prepared item.
            kind: ``"superimpose"`` (needs ``overlay``, a prepared clean item, and ``rng``), ``"amplify"``
                (``factor``) or ``"augment"`` (a mild label-preserving copy; needs ``rng``).
            bounds: the value range (default [`input_range`] of ``[item]``; pass the clean inputs' for tensors).
            **options: ``alpha`` / ``text_mix`` / ``text_mode`` of the superimposition.

        Raises:
            ValueError: an unknown kind, or a missing overlay.
            NotImplementedError: a perturbation the modality does not define (amplifying text).
        """
        if kind not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {kind!r}; choose from {PERTURBATIONS}")
        bounds = bounds if bounds is not None else self.input_range([item])
        if kind == "superimpose":
            if overlay is None or rng is None:
                raise ValueError("superimpose needs overlay= (a prepared clean item) and rng=")
            return superimpose(self.modality, item, overlay, rng, bounds=bounds, **options)
        if kind == "augment":
            if rng is None:
                raise ValueError("augment needs rng=")
            return augment(self.modality, item, rng, bounds=bounds)
        return amplify(self.modality, item, factor, bounds=bounds)

    # ---- shared machinery -----------------------------------------------------------------------------------
    def _find_head(self, example=None) -> HeadInfo:
        if self._head is None:
            example = example if example is not None else self.example_inputs()
            if example is not None:
                example = to_device(example, self.device, self._dtype)
            self.model.eval()
            with torch.no_grad():
                self._head = locate_head(self.model, self.expected_num_classes(), example, forward=self.forward)
            logger.debug("%s: head %s (%s)", model_name(self.model), self._head.name, "; ".join(self._head.tried))
        return self._head

    @property
    def head(self) -> nn.Linear:
        """The final classification ``nn.Linear`` (``head(penultimate) == logits``)."""
        return self._find_head().linear

    @property
    def head_name(self) -> str:
        return self._find_head().name

    @property
    def num_classes(self) -> int:
        n = self.expected_num_classes()
        return n if n is not None else self._find_head().num_classes

    def head_logits(self, penultimate: torch.Tensor) -> torch.Tensor:
        """``head(penultimate)`` in float32, on ``penultimate``'s device (differentiable; used by perturbation
        features and trigger synthesis)."""
        head = self.head
        weight = head.weight.to(device=penultimate.device, dtype=torch.float32)
        bias = None if head.bias is None else head.bias.to(device=penultimate.device, dtype=torch.float32)
        return torch.nn.functional.linear(penultimate.float(), weight, bias)

    def layer_blocks(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the up to ``max_layers`` evenly spaced blocks whose pooled outputs form the layer
        trajectory (the family's rule: `metashield_hf.targets.layers.block_modules`); empty for a model without
        blocks."""
        if self._blocks is None or self._blocks[0] != self.max_layers:
            head = self._find_head().module if self._head is not None else None
            found = block_modules(self.model, head)
            chosen = [found[i] for i in evenly_spaced(len(found), self.max_layers)]
            if not chosen:
                logger.warning("%s: no blocks found for the layer trajectory", model_name(self.model))
            self._blocks = (self.max_layers, chosen)
        return self._blocks[1]

    def _run_batch(self, items: list, layers: bool = False) -> TargetOutput:
        return self.run_prepared(self.preprocess(items), layers=layers)

    def run_prepared(self, model_inputs, *, layers: bool = False) -> TargetOutput:
        """Logits and penultimate activations of inputs already prepared (what [`preprocess`] returns, or token ids
        built directly, as the token-trigger search does). Call it under ``torch.inference_mode`` once the head is
        known (after a first ``adapter(...)`` call). ``layers=True`` also pools the blocks of [`layer_blocks`]."""
        if self._head is None:
            raise RuntimeError("run_prepared needs the head found first: call the adapter on a few inputs before")
        model_inputs = to_device(model_inputs, self.device, self._dtype)
        info = self._head
        blocks = self.layer_blocks() if layers else []
        mask = model_inputs.get("attention_mask") if isinstance(model_inputs, dict) else None
        with capture_penultimate(self.model, info.module) as cap, capture_layers(blocks, mask) as lcap:
            logits = self.forward(model_inputs)
        if info.logits_from_head:
            logits = cap.head_output(logits)
        pen = cap.penultimate(logits)
        return TargetOutput(logits.float().cpu(), pen.float().cpu(), lcap.layers())

    def __call__(self, inputs, batch_size: int | None = None, *, layers: bool = False) -> TargetOutput:
        """Run the model on ``inputs`` in batches (``eval()`` mode, ``torch.inference_mode``).

        Args:
            inputs: one item or many (see the adapter's modality), a batched tensor, or a `datasets.Dataset`/column.
            batch_size: overrides the adapter's ``batch_size`` for this call.
            layers: also return the pooled activations of the layer trajectory (``TargetOutput.layers``).

        Returns:
            [`TargetOutput`] with float32 CPU ``logits (N, C)`` and ``penultimate (N, D)``.
        """
        size = self.batch_size if batch_size is None else batch_size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size must be a positive int, got {size!r}")
        chunks = batched(self.iter_items(inputs), size)
        first = next(chunks, None)
        if first is None:
            raise ValueError(f"{model_name(self.model)}: no inputs given (got an empty {type(inputs).__name__})")
        if self._head is None:  # dry run outside inference mode, so the head copy stays usable with autograd
            example = self.example_inputs()
            self._find_head(example if example is not None else self.preprocess(first))
        self.model.eval()
        outputs = []
        with torch.inference_mode():
            for chunk in itertools.chain([first], chunks):
                outputs.append(self._run_batch(chunk, layers))
        out = TargetOutput.cat(outputs)  # outside inference mode: normal tensors downstream code may modify
        bad = ~(torch.isfinite(out.logits).all(1) & torch.isfinite(out.penultimate).all(1))
        if bad.any():
            raise ValueError(
                f"{model_name(self.model)} produced NaN/inf activations for {int(bad.sum())} of {len(out)} rows; "
                "check those inputs and the weights (fp16 overflow? load with dtype=torch.float32)"
            )
        return out

    def __repr__(self) -> str:
        head = self._head.name if self._head is not None else "?"
        return f"{type(self).__name__}(model={model_name(self.model)}, modality={self.modality!r}, head={head!r})"
