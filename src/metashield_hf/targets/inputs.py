"""Turning what users pass (one item, a list, a batched tensor, a `datasets.Dataset` or a column) into items.

Image items end up as float ``(C, H, W)`` tensors in ``[0, 1]`` with the channel count the model wants, so that HF
image processors (called with ``do_rescale=False``) and timm transforms see one format whatever came in.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

# ITU-R 601-2 luma, the weights PIL's convert("L") uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def is_pil(x) -> bool:
    """Whether ``x`` is a PIL image (without importing PIL when it is missing)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(x, Image.Image)


def describe(x) -> str:
    """A short description of an input for error messages (type, and shape where it has one)."""
    if isinstance(x, str):
        return f"str {x[:40]!r}"
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__module__.split('.')[0]}.{type(x).__name__} of shape {tuple(x.shape)}"
    if is_pil(x):
        return f"PIL.Image ({x.mode}, {x.size[0]}x{x.size[1]})"
    return type(x).__name__


def dataset_column(ds, modality: str) -> Iterable:
    """The column of a `datasets.Dataset` to use: the first string column (text) or first `Image` column (images)."""
    from datasets import Image as ImageFeature
    from datasets import Value

    for name, feature in ds.features.items():
        if modality == "text" and isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            return ds[name]
        if modality == "image" and isinstance(feature, ImageFeature):
            return ds[name]
    want = "string column" if modality == "text" else "Image feature column"
    raise ValueError(
        f"the dataset has no {want} (features: {dict(ds.features)}); pass the column you want, e.g. ds['<column>']"
    )


def iter_items(inputs, modality: str, who: str = "the model") -> Iterator:
    """Yield raw items one by one; a single item (a str, an image, a CHW tensor) is yielded alone.

    Args:
        inputs: one item or an iterable of items, a batched ``(N, C, H, W)`` tensor/array, or a `datasets.Dataset`.
        modality: ``"text"`` or ``"image"`` (the ``torch`` adapter splits tensors itself).
        who: the model's name, for error messages.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(inputs, datasets.Dataset):
        inputs = dataset_column(inputs, modality)
    if isinstance(inputs, str) or is_pil(inputs):
        yield inputs
        return
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        if modality == "image" and inputs.ndim in (2, 3):
            yield inputs  # one image: HW, CHW or HWC
            return
        if modality == "image" and inputs.ndim != 4:
            raise ValueError(f"{who} expects images as 2-d, 3-d or a 4-d batch, got {describe(inputs)}")
        if modality == "text":
            check_text(inputs, who)
        yield from inputs
        return
    if isinstance(inputs, dict):
        raise ValueError(
            f"got a dict with keys {sorted(inputs)[:6]}; pass raw inputs (strings or images), not a tokenized batch "
            "or a dataset row"
        )
    if not isinstance(inputs, Iterable):
        raise ValueError(f"inputs must be an item or an iterable of items, got {describe(inputs)}")
    yield from inputs


def batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def check_text(item, who: str) -> str:
    if isinstance(item, str):
        return item
    kind = "images" if is_pil(item) or isinstance(item, (np.ndarray, torch.Tensor)) else "other objects"
    raise ValueError(f"{who} expects text (str), got {kind}: {describe(item)}; pass strings to a text classifier")


def check_image(item, who: str):
    if isinstance(item, str):
        raise ValueError(
            f"{who} expects images (PIL.Image, numpy arrays or tensors), got {describe(item)}; "
            "pass images to an image classifier (open image files with PIL.Image.open first)"
        )
    if not (is_pil(item) or isinstance(item, (np.ndarray, torch.Tensor))):
        raise ValueError(f"{who} expects images (PIL.Image, numpy arrays or tensors), got {describe(item)}")
    return item


def pil_with_channels(img, channels: int | None):
    """Convert a PIL image to the mode the model wants (grey/RGBA/palette → RGB, or → L for 1-channel models)."""
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_chw(item, channels: int | None, who: str = "the model") -> torch.Tensor:
    """One image (PIL, numpy or tensor) as a ``(C, H, W)`` tensor with ``channels`` channels.

    Integer images (PIL, uint8 arrays: HWC or HW in ``[0, 255]``) stay ``uint8``, so an image processor sees exactly
    what it would see for the PIL image; float arrays and tensors (CHW in ``[0, 1]``; HWC is accepted where only the
    last axis looks like channels) become float32.
    """
    item = check_image(item, who)
    if is_pil(item):
        item = np.array(pil_with_channels(item, channels))  # a writable copy
    x = torch.as_tensor(item).detach().cpu()
    integer = not (x.is_floating_point() or x.is_complex())
    if x.dim() == 2:
        x = x[None]
    elif x.dim() != 3:
        raise ValueError(f"{who}: an image must be HW, CHW or HWC, got {describe(item)}")
    elif (integer and x.shape[-1] in (1, 3, 4)) or (x.shape[0] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4)):
        # uint8 arrays come HWC (PIL/numpy convention); float CHW unless only the last axis looks like channels.
        x = x.permute(2, 0, 1)
    if integer:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise ValueError(f"{who}: integer images must be in [0, 255], got {describe(item)}")
        x = x.to(torch.uint8)
    else:
        x = x.float()
        if x.numel() and float(x.max()) > 1.5:
            logger.warning("%s: float image with values up to %.1f; float images are expected in [0, 1]", who, x.max())
    c = x.shape[0]
    if c == 4:
        x, c = x[:3], 3  # drop alpha, as PIL's convert("RGB") does
    want = channels or c
    if c == want:
        return x.contiguous()
    if c == 1 and want == 3:
        return x.expand(3, -1, -1).clone()
    if c == 3 and want == 1:
        grey = (x.float() * _LUMA[:, None, None]).sum(0, keepdim=True)
        return grey.round().clamp(0, 255).to(torch.uint8) if integer else grey
    raise ValueError(f"{who} expects {want}-channel images, got {describe(item)} ({c} channels)")


def to_chw_float(item, channels: int | None, who: str = "the model") -> torch.Tensor:
    """Like [`to_chw`], always float32 in ``[0, 1]``."""
    x = to_chw(item, channels, who)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x
