"""Adapters for timm models and for plain ``torch.nn.Module`` classifiers (e.g. the federated-learning CNNs)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .base import TARGETS, TargetAdapter, model_name
from .heads import call_model
from .inputs import check_image, describe, is_pil, pil_with_channels, to_chw
from .transformers_models import is_transformers_model


def _tensor_to_pil(x: torch.Tensor):
    from PIL import Image

    if x.dtype != torch.uint8:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = x.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


@TARGETS.register("timm")
class TimmAdapter(TargetAdapter):
    """timm classifiers: PIL images, arrays or tensors, preprocessed with the model's own ``pretrained_cfg``.

    Args:
        model: a timm model (``timm.create_model(...)``; from a folder ``timm.create_model("local-dir:<folder>",
            pretrained=True)``: without ``pretrained=True`` timm builds the architecture with random weights).
        processor: a transform for one image; default ``create_transform(**resolve_data_config(model=model))``
            (eval: resize, center crop, normalize). PIL images go through it as PIL, arrays/tensors as float CHW.
    """

    name = "timm"
    modality = "image"

    def __init__(self, model, processor=None, *, batch_size=32, device=None):
        super().__init__(model, processor, batch_size=batch_size, device=device)
        from timm.data import create_transform, resolve_data_config

        self.data_config = resolve_data_config(model=model)
        self.transform = processor if processor is not None else create_transform(**self.data_config)
        self.channels = int(self.data_config["input_size"][0])
        self._find_head()

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return (
            "timm" in sys.modules
            and type(model).__module__.startswith("timm.")
            and isinstance(getattr(model, "pretrained_cfg", None), dict)
            and hasattr(model, "get_classifier")
        )

    def expected_num_classes(self) -> int | None:
        n = getattr(self.model, "num_classes", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def _one(self, item, who: str) -> torch.Tensor:
        item = check_image(item, who)
        if is_pil(item):
            return self.transform(pil_with_channels(item, self.channels))
        x = to_chw(item, self.channels, who)
        if x.dtype == torch.uint8:  # integer images go the way timm users send them: as PIL images
            return self.transform(_tensor_to_pil(x))
        try:
            return self.transform(x)
        except TypeError:  # a user transform that only takes PIL images (torchvision ToTensor)
            return self.transform(_tensor_to_pil(x))

    def preprocess(self, items: list) -> torch.Tensor:
        who = model_name(self.model)
        return torch.stack([self._one(x, who) for x in items])

    def example_inputs(self) -> torch.Tensor:
        _, h, w = self.data_config["input_size"]
        return self.preprocess([torch.full((self.channels, h, w), 0.5)])


def _input_ndim(model: nn.Module) -> int | None:
    """Dimensions of one sample, guessed from the first layer with weights (Conv2d → 3, Linear → 1)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return {nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}[type(m)]
        if isinstance(m, nn.Linear):
            return 1
    return None


@TARGETS.register("torch")
class TorchAdapter(TargetAdapter):
    """Plain ``torch.nn.Module`` classifiers: inputs are preprocessed tensors (a batch, or a list of samples).

    The head is found by a dry run on the first batch (or on ``example_inputs``): the last executed ``nn.Linear``
    whose output equals the model's output.

    Args:
        model: any module whose forward takes one tensor and returns logits ``(N, C)``.
        processor: optional callable applied to each sample tensor before stacking.
        example_inputs: an optional batch to find the head at construction.
    """

    name = "torch"
    modality = "tensor"

    def __init__(self, model, processor=None, *, batch_size=32, device=None, example_inputs=None):
        super().__init__(model, processor, batch_size=batch_size, device=device)
        if not any(
            isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear) for m in model.modules()
        ):
            raise ValueError(
                f"no classification head in {type(model).__name__}: it has no nn.Linear layer (tried: nn.Linear "
                "modules, PEFT-wrapped Linear layers); MetaShield needs a classifier ending in nn.Linear(…, num_classes)"
            )
        self.sample_ndim = _input_ndim(model)
        if example_inputs is not None:
            self._find_head(self.preprocess(list(self.iter_items(example_inputs))))

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        # transformers models without a classification head (BertModel) are refused here on purpose.
        return isinstance(model, nn.Module) and not is_transformers_model(model)

    def expected_num_classes(self) -> int | None:
        n = getattr(self.model, "num_classes", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def _find_head(self, example=None):
        if self._head is None and example is None:
            raise ValueError(
                f"the head of {type(self.model).__name__} is found on the first batch: call the adapter on inputs "
                "first, or build it with example_inputs="
            )
        return super()._find_head(example)

    def iter_items(self, inputs) -> Iterator[torch.Tensor]:
        who = type(self.model).__name__
        if isinstance(inputs, np.ndarray):
            inputs = torch.as_tensor(inputs)
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() == 0:
                raise ValueError(f"{who} expects tensors with a batch dimension, got a scalar tensor")
            if self.sample_ndim is not None and inputs.dim() == self.sample_ndim:
                yield inputs  # one sample
            else:
                yield from inputs
            return
        if isinstance(inputs, (str, dict)) or is_pil(inputs) or not isinstance(inputs, Iterable):
            raise ValueError(f"{who} (a plain torch model) expects preprocessed tensors, got {describe(inputs)}")
        for item in inputs:
            if isinstance(item, np.ndarray):
                item = torch.as_tensor(item)
            if not isinstance(item, torch.Tensor):
                raise ValueError(f"{who} (a plain torch model) expects preprocessed tensors, got {describe(item)}")
            yield item

    def preprocess(self, items: list) -> torch.Tensor:
        if self.processor is not None:
            items = [self.processor(x) for x in items]
        shapes = {tuple(x.shape) for x in items}
        if len(shapes) > 1:
            raise ValueError(f"{type(self.model).__name__}: samples of different shapes {sorted(shapes)} in one batch")
        x = torch.stack(list(items))
        return x if x.is_floating_point() else x.float()

    def forward(self, model_inputs: torch.Tensor) -> torch.Tensor:
        try:
            return call_model(self.model, model_inputs)
        except RuntimeError as e:
            raise ValueError(
                f"{type(self.model).__name__} failed on a batch of shape {tuple(model_inputs.shape)} "
                f"(one sample: {tuple(model_inputs.shape[1:])}): {e}"
            ) from e
