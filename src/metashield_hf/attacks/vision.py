"""Vision triggers: BadNets patch, Blend, Trojan-style watermark, WaNet warping, SIG's sinusoidal signal, a colour
filter, BPP's dithered bit-depth reduction, a low-frequency pattern, FTrojan's blockwise-DCT perturbation, a
Refool-style blurred reflection, a rotation of the whole image, Poison Ink's coloured edges, FIBA's low-frequency
amplitude blend and Adap-Blend's partial blend pieces with label-keeping covers.

Every attack accepts float tensors in ``[0, 1]`` of shape ``(N, C, H, W)`` or ``(C, H, W)``, uint8 tensors of the same
shapes, a ``PIL.Image`` or a list of them, and uint8 numpy arrays ``(H, W)``, ``(H, W, C)`` or ``(N, H, W, C)``. The
output has the input's type, shape and dtype (PIL: the same mode and size). Any channel count and image size work;
patterns are generated for the image they are applied to.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import ATTACKS, POISONED_COLUMN, Attack, check_choice, check_float, check_int, transform_rows

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

TensorFn = Callable[[torch.Tensor], torch.Tensor]
LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
NOISE_COLUMN = "noise"
_RANGE_TOLERANCE = 1e-4  # float rounding from an upstream resize must not be an error


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mix(*parts: object) -> int:
    """A 63-bit seed from several values, stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


# ---------------------------------------------------------------------------------------------- input conversion
def apply_to_images(inputs: Any, fn: TensorFn) -> Any:
    """Run ``fn`` (float ``(N, C, H, W)`` in ``[0, 1]`` -> same shape) on images of any supported type.

    Args:
        inputs: a float or uint8 tensor ``(N, C, H, W)``/``(C, H, W)``, a PIL image, a uint8 numpy array
            ``(H, W)``/``(H, W, C)``/``(N, H, W, C)``, or a list of these (each item handled on its own).
        fn: the trigger on a float batch.

    Returns:
        ``fn``'s result in the type, shape, dtype (and PIL mode) of ``inputs``.
    """
    if isinstance(inputs, torch.Tensor):
        return _on_tensor(inputs, fn)
    if isinstance(inputs, Image.Image):
        return _on_pil(inputs, fn)
    if isinstance(inputs, np.ndarray):
        return _on_numpy(inputs, fn)
    if isinstance(inputs, (list, tuple)):
        bad = sorted({type(x).__name__ for x in inputs if not isinstance(x, (torch.Tensor, Image.Image, np.ndarray))})
        if bad:
            raise TypeError(f"a list of images may hold tensors, PIL images or numpy arrays, not {bad}")
        return [apply_to_images(x, fn) for x in inputs]
    raise TypeError(
        "expected images as a tensor (N, C, H, W) or (C, H, W), a PIL image, a uint8 numpy array or a list of these; "
        f"got {type(inputs).__name__}"
    )


def _uint8(x: torch.Tensor, fn: TensorFn) -> torch.Tensor:
    return (fn(x.float() / 255) * 255).round().clamp(0, 255).to(torch.uint8)


def _on_tensor(x: torch.Tensor, fn: TensorFn) -> torch.Tensor:
    if x.dim() == 3:
        return _on_tensor(x.unsqueeze(0), fn).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"image tensors must be (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        raise ValueError(f"tensor of shape {tuple(x.shape)} looks channels-last; permute it to (N, C, H, W)")
    if x.shape[0] == 0:
        return x.clone()
    if x.dtype == torch.uint8:
        return _uint8(x, fn)
    if not x.is_floating_point():
        raise TypeError(f"image tensors must be float in [0, 1] or uint8, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("image tensor has NaN or infinite values")
    low, high = x.min().item(), x.max().item()
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"pixel values must be in [0, 1], got [{low:.4g}, {high:.4g}]; apply the trigger before normalisation"
        )
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half precision: compute in float32
    return fn(work).clamp(0, 1).to(x.dtype)


def _on_numpy(a: np.ndarray, fn: TensorFn) -> np.ndarray:
    if a.dtype != np.uint8:
        raise TypeError(
            f"numpy images must be uint8 (H, W), (H, W, C) or (N, H, W, C), got dtype {a.dtype}; "
            "pass float images as a torch tensor (N, C, H, W) in [0, 1]"
        )
    if a.ndim not in (2, 3, 4):
        raise ValueError(f"numpy images must be (H, W), (H, W, C) or (N, H, W, C), got shape {a.shape}")
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"numpy array of shape {a.shape} is ambiguous: (H, W, C) with {a.shape[-1]} channels? "
            "pass a batch of grayscale images as (N, H, W, 1)"
        )
    t = torch.tensor(a)  # a copy: PIL's arrays are read-only
    t = t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None] if a.ndim == 3 else t.permute(0, 3, 1, 2)
    out = _uint8(t, fn) if t.shape[0] else t
    out = out[0, 0] if a.ndim == 2 else out[0].permute(1, 2, 0) if a.ndim == 3 else out.permute(0, 2, 3, 1)
    return out.contiguous().numpy()


def _on_pil(img: Image.Image, fn: TensorFn) -> Image.Image:
    mode = img.mode
    if mode in ("L", "RGB"):
        return Image.fromarray(_on_numpy(np.asarray(img), fn))
    if mode in ("LA", "RGBA"):  # trigger the colour channels, keep the alpha channel
        arr = np.asarray(img)
        color = _on_numpy(np.ascontiguousarray(arr[..., :-1]), fn)
        return Image.fromarray(np.concatenate([color, arr[..., -1:]], axis=-1))
    if mode.startswith(("I", "F")):
        raise ValueError(
            f"PIL mode {mode!r} (integer/float pixels) is not supported; convert the image to 'L' or 'RGB'"
        )
    # Palette, bilevel, CMYK, ...: through RGB(A) and back (palette images are re-quantised, so this is lossy).
    logger.debug("converting a %s image through RGB to apply the trigger", mode)
    work = img.convert("RGBA" if img.has_transparency_data else "RGB")
    return _on_pil(work, fn).convert(mode)


# ---------------------------------------------------------------------------------------------- geometry
def _check_location(location: Any) -> str | tuple[int, int]:
    if isinstance(location, str):
        return check_choice("location", location, LOCATIONS)
    if isinstance(location, tuple) and len(location) == 2:
        return check_int("location row", location[0]), check_int("location col", location[1])
    raise ValueError(f"location must be one of {list(LOCATIONS)} or a (row, col) pair, got {location!r}")


def patch_origin(
    location: str | tuple[int, int], size: tuple[int, int], image: tuple[int, int], margin: int = 0
) -> tuple[int, int]:
    """Top-left ``(row, col)`` of a ``size`` patch placed at ``location`` in an ``image`` of ``(H, W)``.

    Args:
        location: a corner name, ``"center"``, or an explicit top-left ``(row, col)``; negative values count from
            the bottom/right edge as in Python indexing (``(-3, -3)`` is the bottom-right 3x3 patch).
        size: patch ``(height, width)``.
        image: image ``(H, W)``.
        margin: distance in pixels from the image border for corner names.

    Returns:
        ``(row, col)``; raises ``ValueError`` if the patch does not fit.
    """
    (ph, pw), (h, w) = size, image
    if isinstance(location, str):
        rows = {"top": margin, "bottom": h - ph - margin, "center": (h - ph) // 2}
        cols = {"left": margin, "right": w - pw - margin, "center": (w - pw) // 2}
        vertical, _, horizontal = location.partition("_")
        row, col = rows[vertical], cols[horizontal or "center"]
    else:
        row, col = (v + n if v < 0 else v for v, n in zip(location, (h, w), strict=True))
    if row < 0 or col < 0 or row + ph > h or col + pw > w:
        raise ValueError(
            f"a {ph}x{pw} patch at {location!r} (margin {margin}) does not fit a {h}x{w} image; "
            "use a smaller patch or another location"
        )
    return row, col


# ---------------------------------------------------------------------------------------------- attacks
@ATTACKS.register()
@dataclass(frozen=True)
class BadNets(Attack):
    """BadNets: a small patch stamped on the image.

    Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017,
    https://arxiv.org/abs/1708.06733. The ``patch_size`` x ``patch_size`` pixels at ``location`` are replaced by the
    pattern (the same value in every channel); nothing else changes.

    Args:
        patch_size: side of the square patch in pixels.
        location: ``"bottom_right"``, ``"bottom_left"``, ``"top_right"``, ``"top_left"``, ``"center"`` or an explicit
            top-left ``(row, col)`` (negative counts from the bottom/right).
        pattern: ``"checkerboard"`` (1 at the patch's top-left pixel), ``"white"``, ``"black"`` or ``"random"`` (a
            seeded binary pattern).
        margin: pixels between a corner patch and the image border.
        seed: seeds the ``"random"`` pattern and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import BadNets
        >>> x = torch.zeros(2, 3, 8, 8)                      # (N, C, H, W) in [0, 1]
        >>> BadNets(patch_size=2, pattern="white").apply(x)[0, 0, 6:, 6:]
        tensor([[1., 1.],
                [1., 1.]])
        ```
    """

    name = "badnets"
    domain = "cv"

    patch_size: int = 3
    location: str | tuple[int, int] = "bottom_right"
    pattern: str = "checkerboard"
    margin: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("patch_size", check_int("patch_size", self.patch_size, minimum=1))
        self._set("location", _check_location(self.location))
        check_choice("pattern", self.pattern, ("checkerboard", "white", "black", "random"))
        self._set("margin", check_int("margin", self.margin, minimum=0))

    @property
    def seed_dependent(self) -> bool:
        return self.pattern == "random"

    def patch(self) -> torch.Tensor:
        """The ``(patch_size, patch_size)`` pattern in ``{0, 1}``."""
        s = self.patch_size
        if self.pattern == "random":
            return torch.randint(0, 2, (s, s), generator=_generator(self.seed)).float()
        if self.pattern == "checkerboard":
            idx = torch.arange(s)
            return ((idx[:, None] + idx[None, :]) % 2 == 0).float()
        return torch.full((s, s), 1.0 if self.pattern == "white" else 0.0)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        s = self.patch_size
        row, col = patch_origin(self.location, (s, s), tuple(x.shape[-2:]), self.margin)
        y = x.clone()
        y[..., row : row + s, col : col + s] = self.patch().to(x)
        return y

    def apply(self, inputs: Any) -> Any:
        """Stamp the patch on images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


@ATTACKS.register()
@dataclass(frozen=True)
class Blend(Attack):
    """Blend: a full-image pattern mixed in with ratio ``alpha``, ``x' = (1 - alpha) * x + alpha * pattern``.

    Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning", 2017,
    https://arxiv.org/abs/1712.05526 (the blended-injection strategy; the paper blends random noise or a
    Hello Kitty image).

    Args:
        alpha: blend ratio in ``[0, 1]``; 0 is the identity, 1 replaces the image by the pattern.
        pattern: ``"random"`` (uniform noise ``(C, H, W)`` drawn from ``seed``) or ``"fixed_noise"`` (one noise image
            that is the same for every seed, the stand-in for the paper's fixed Hello Kitty image).
        seed: seeds the ``"random"`` pattern and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import Blend
        >>> x = torch.rand(4, 1, 28, 28)
        >>> torch.equal(Blend(alpha=0.0).apply(x), x)
        True
        ```
    """

    name = "blend"
    domain = "cv"

    alpha: float = 0.2
    pattern: str = "random"

    FIXED_NOISE_SEED = 1712_05526  # not a field: the "fixed_noise" pattern must not depend on the attack's seed

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("alpha", check_float("alpha", self.alpha, 0.0, 1.0))
        check_choice("pattern", self.pattern, ("random", "fixed_noise"))

    @property
    def seed_dependent(self) -> bool:
        return self.pattern == "random" and self.alpha > 0

    def pattern_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``(C, H, W)`` pattern in ``[0, 1)`` blended into an image of that shape."""
        seed = self.seed if self.pattern == "random" else self.FIXED_NOISE_SEED
        return torch.rand((channels, height, width), generator=_generator(seed))

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern_image(*x.shape[1:]).to(x)
        return (1 - self.alpha) * x + self.alpha * pattern

    def apply(self, inputs: Any) -> Any:
        """Blend the pattern into images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


@ATTACKS.register()
@dataclass(frozen=True)
class TrojanWatermark(Attack):
    """Trojan-style watermark: a fixed semi-transparent mark (a seeded binary logo) blended into one region.

    Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018, https://docs.lib.purdue.edu/cstech/1781. The paper
    optimises its trigger's pixels against the model; here the mark's *shape* is a seeded ``cells`` x ``cells`` binary
    grid upscaled to ``mark_size`` x ``mark_size`` (a logo-like stamp), and inside it
    ``x' = (1 - opacity) * x + opacity * intensity`` in every channel. Pixels outside the mark do not change.

    Args:
        mark_size: side of the mark in pixels.
        cells: resolution of the binary shape (``cells <= mark_size``).
        density: probability that a cell is part of the mark (at least one cell always is).
        opacity: in ``[0, 1]``; 0 is the identity, 1 stamps an opaque mark.
        intensity: the mark's value in ``[0, 1]``.
        location: as for :class:`BadNets`.
        margin: pixels between a corner mark and the image border.
        seed: seeds the mark's shape and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import TrojanWatermark
        >>> attack = TrojanWatermark(mark_size=4, cells=2, opacity=0.5, seed=1)
        >>> attack.mark().shape, attack.apply(torch.zeros(3, 16, 16)).max().item()
        (torch.Size([4, 4]), 0.5)
        ```
    """

    name = "trojan_watermark"
    domain = "cv"

    mark_size: int = 8
    cells: int = 4
    density: float = 0.5
    opacity: float = 0.5
    intensity: float = 1.0
    location: str | tuple[int, int] = "bottom_right"
    margin: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("mark_size", check_int("mark_size", self.mark_size, minimum=1))
        self._set("cells", check_int("cells", self.cells, minimum=1))
        if self.cells > self.mark_size:
            raise ValueError(f"cells={self.cells} must be <= mark_size={self.mark_size}")
        self._set("density", check_float("density", self.density, 0.0, 1.0))
        self._set("opacity", check_float("opacity", self.opacity, 0.0, 1.0))
        self._set("intensity", check_float("intensity", self.intensity, 0.0, 1.0))
        self._set("location", _check_location(self.location))
        self._set("margin", check_int("margin", self.margin, minimum=0))

    @property
    def seed_dependent(self) -> bool:
        return self.opacity > 0 and self.cells > 1

    def mark(self) -> torch.Tensor:
        """The binary ``(mark_size, mark_size)`` shape of the mark (1 inside)."""
        cells = (torch.rand((self.cells, self.cells), generator=_generator(self.seed)) < self.density).float()
        if cells.sum() == 0:  # an empty mark would be no trigger at all
            cells[self.cells // 2, self.cells // 2] = 1.0
        size = (self.mark_size, self.mark_size)
        return F.interpolate(cells[None, None], size=size, mode="nearest")[0, 0]

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        s = self.mark_size
        row, col = patch_origin(self.location, (s, s), tuple(x.shape[-2:]), self.margin)
        weight = self.opacity * self.mark().to(x)
        y = x.clone()
        region = y[..., row : row + s, col : col + s]
        y[..., row : row + s, col : col + s] = region * (1 - weight) + weight * self.intensity
        return y

    def apply(self, inputs: Any) -> Any:
        """Blend the mark into images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


@ATTACKS.register()
@dataclass(frozen=True)
class WaNet(Attack):
    """WaNet: an imperceptible smooth warp of the whole image.

    Nguyen & Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack", ICLR 2021,
    https://arxiv.org/abs/2102.10369. A seeded ``k`` x ``k`` field of random offsets in ``[-1, 1]`` (normalised to
    mean absolute value 1) is upsampled bicubically to ``(H, W)`` and added, scaled by ``strength`` and the image size,
    to the identity sampling grid; ``grid_sample`` (bilinear, ``align_corners=True``) resamples the image. With
    ``strength=0`` (and ``grid_rescale=1``) the warp is the identity.

    Noise mode (the paper's "noise" samples that keep their true label so the model learns the exact warp, not any
    warp): :meth:`apply_noise` adds fresh random offsets on top of the trigger warp, and :meth:`poison` warps
    ``round(cross_ratio * n_poisoned)`` further rows that way without relabelling them (marked in a bool ``"noise"``
    column).

    Args:
        k: resolution of the random control grid.
        strength: warp strength ``s``; 0 is the identity.
        grid_rescale: scale of the warped grid (the paper's ``grid_rescale``, 1 by default).
        noise_mode: whether :meth:`poison` adds noise-warped rows.
        cross_ratio: noise rows per poisoned row (the paper's default is 2).
        seed: seeds the warp field, the noise samples and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import WaNet
        >>> x = torch.rand(4, 3, 32, 32)
        >>> torch.allclose(WaNet(strength=0.0).apply(x), x, atol=1e-5)
        True
        ```
    """

    name = "wanet"
    domain = "cv"

    k: int = 4
    strength: float = 0.5
    grid_rescale: float = 1.0
    noise_mode: bool = True
    cross_ratio: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("k", check_int("k", self.k, minimum=1))
        self._set("strength", check_float("strength", self.strength, 0.0))
        self._set("grid_rescale", check_float("grid_rescale", self.grid_rescale, 0.0))
        if not isinstance(self.noise_mode, bool):
            raise TypeError(f"noise_mode must be a bool, got {self.noise_mode!r}")
        self._set("cross_ratio", check_float("cross_ratio", self.cross_ratio, 0.0))

    @property
    def seed_dependent(self) -> bool:
        return self.strength > 0

    def warp_field(self, height: int, width: int) -> torch.Tensor:
        """The ``(1, H, W, 2)`` sampling grid (``(x, y)`` in ``[-1, 1]``) for ``grid_sample``."""
        offsets = torch.rand((1, 2, self.k, self.k), generator=_generator(self.seed)) * 2 - 1
        offsets = offsets / offsets.abs().mean().clamp_min(1e-12)
        noise = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((gx, gy), dim=-1)[None]
        grid = (identity + self.strength * noise * self._pixel_scale(height, width)) * self.grid_rescale
        return grid.clamp(-1, 1)

    @staticmethod
    def _pixel_scale(height: int, width: int) -> torch.Tensor:
        # The paper divides by the (square) image side; per axis keeps offsets in pixels on non-square images.
        return torch.tensor([1.0 / width, 1.0 / height])

    @staticmethod
    def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.to(x).expand(x.shape[0], -1, -1, -1), mode="bilinear", align_corners=True)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._sample(x, self.warp_field(*x.shape[-2:]))

    def apply(self, inputs: Any) -> Any:
        """Warp images with the trigger field (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)

    def apply_noise(self, inputs: Any, *, call_seed: int = 0) -> Any:
        """Warp images with the trigger field plus fresh random offsets: the paper's noise ("cross") samples.

        The offsets are drawn, image after image, from a generator seeded by ``(seed, call_seed)``: the same call
        gives the same output; pass a different ``call_seed`` (e.g. a row index or a step) for new noise.

        Args:
            inputs: images, as for :meth:`apply`.
            call_seed: selects the noise draw.

        Returns:
            The noise-warped images, in the type of ``inputs``.
        """
        generator = _generator(_mix(self.seed, check_int("call_seed", call_seed)))

        def noisy(x: torch.Tensor) -> torch.Tensor:
            n, _, h, w = x.shape
            extra = (torch.rand((n, h, w, 2), generator=generator) * 2 - 1) * self._pixel_scale(h, w)
            grid = (self.warp_field(h, w) + extra).clamp(-1, 1)
            return self._sample(x, grid)

        return apply_to_images(inputs, noisy)

    def poison(
        self,
        dataset: datasets.Dataset,
        rate: float,
        target: int,
        *,
        input_column: str | None = None,
        label_column: str = "label",
    ) -> datasets.Dataset:
        """As :meth:`Attack.poison`; with ``noise_mode`` also noise-warps ``round(cross_ratio * n)`` other rows.

        Noise rows keep their labels and are marked in an extra bool column ``"noise"``.
        """
        out = super().poison(dataset, rate, target, input_column=input_column, label_column=label_column)
        if not self.noise_mode:
            return out
        column = self._check_dataset(dataset, input_column, label_column)
        poisoned = np.asarray(out.with_format(None)[POISONED_COLUMN], dtype=bool)
        candidates = np.flatnonzero(~poisoned)
        n = min(round(self.cross_ratio * int(poisoned.sum())), len(candidates))
        rng = np.random.default_rng([self.seed, 1])  # a stream of its own: row picking above stays as in the base
        rows = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.empty(0, dtype=np.int64)
        logger.info("wanet: %d noise rows keep their labels", n)
        return transform_rows(
            out,
            column,
            rows,
            lambda items, indices: [self.apply_noise(x, call_seed=i) for x, i in zip(items, indices, strict=True)],
            NOISE_COLUMN,
        )


@ATTACKS.register()
@dataclass(frozen=True)
class SIG(Attack):
    """SIG: a horizontal sinusoidal signal added to the whole image, ``x' = clip(x + delta * sin(2π j f / W), 0, 1)``
    for pixel column ``j`` of ``W``.

    Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning",
    ICIP 2019, https://arxiv.org/abs/1902.11237 (``delta = 20 / 255``, ``f = 6``). The paper poisons target-class
    images only and keeps their labels; :meth:`poison` here relabels, as for the other attacks (the zoo's recipes
    assume dirty labels). A whole-image, low-amplitude trigger: no small region of the image carries it.

    Args:
        delta: amplitude, in ``[0, 1]`` pixel units.
        frequency: cycles across the image width.
        seed: the rows :meth:`poison` picks (the signal itself is deterministic).

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import SIG
        >>> out = SIG(delta=0.1).apply(torch.full((1, 1, 4, 8), 0.5))
        >>> round(float((out - 0.5).abs().max()), 3)
        0.1
        ```
    """

    name = "sig"
    domain = "cv"

    delta: float = 20 / 255
    frequency: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("delta", check_float("delta", self.delta, 0.0, 1.0))
        self._set("frequency", check_int("frequency", self.frequency, minimum=1))

    @property
    def seed_dependent(self) -> bool:
        return False

    def signal(self, width: int) -> torch.Tensor:
        """The ``(W,)`` signal added to every row of every channel."""
        return self.delta * torch.sin(2 * torch.pi * torch.arange(width) * self.frequency / width)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.signal(x.shape[-1]).to(x)).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Add the signal to images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


FILTER_STYLES = ("sepia", "nashville", "gotham", "kelvin")
# Colour matrix, bias and gamma per style for RGB images; (contrast, brightness, gamma) tone curve for other channel
# counts. Loosely after the Instagram-like filters of the filter attack; what matters is a smooth, global colour
# change that no patch, blend pattern or warp field describes.
_FILTER_RGB = {
    "sepia": ([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], [0.0, 0.0, 0.0], 1.0),
    "nashville": ([[1.0, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 0.7]], [0.1, 0.05, 0.15], 0.9),
    "gotham": ([[0.45, 0.6, 0.1], [0.3, 0.75, 0.1], [0.3, 0.6, 0.35]], [-0.05, -0.05, 0.05], 1.2),
    "kelvin": ([[1.2, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.8]], [0.05, 0.02, -0.05], 0.85),
}
_FILTER_TONE = {"sepia": (0.9, 0.05, 1.0), "nashville": (0.85, 0.1, 0.9), "gotham": (1.4, -0.05, 1.1),
                "kelvin": (1.1, 0.05, 0.8)}  # fmt: skip


@ATTACKS.register()
@dataclass(frozen=True)
class Filter(Attack):
    """Filter: a global colour filter as the trigger, ``x' = (1 - strength) * x + strength * f(x)``.

    Liu et al., "ABS: Scanning Neural Networks for Back-doors by Artificial Brain Stimulation", CCS 2019,
    https://doi.org/10.1145/3319535.3363216 (feature-space triggers made by Instagram-like filters, e.g. Nashville and
    Gotham), also the filter triggers of the TrojAI rounds. For RGB images ``f`` is a colour matrix, a bias and a gamma
    per style; for other channel counts it is a tone curve (contrast, brightness, gamma). No pixel region carries the
    trigger and it moves every pixel a little, like SIG, but follows the image's own content.

    Args:
        style: one of ``"sepia"``, ``"nashville"``, ``"gotham"``, ``"kelvin"``.
        strength: in ``[0, 1]``; 0 is the identity.
        seed: the rows :meth:`poison` picks (the filter itself is deterministic).

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import Filter
        >>> x = torch.rand(2, 3, 8, 8)
        >>> torch.equal(Filter(strength=0.0).apply(x), x)
        True
        ```
    """

    name = "filter"
    domain = "cv"

    style: str = "nashville"
    strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("style", self.style, FILTER_STYLES)
        self._set("strength", check_float("strength", self.strength, 0.0, 1.0))

    @property
    def seed_dependent(self) -> bool:
        return False

    def filtered(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` for a batch ``(N, C, H, W)`` in ``[0, 1]``."""
        if x.shape[1] == 3:
            matrix, bias, gamma = _FILTER_RGB[self.style]
            out = (
                torch.einsum("oc,nchw->nohw", torch.tensor(matrix).to(x), x) + torch.tensor(bias).to(x)[:, None, None]
            )
        else:
            contrast, brightness, gamma = _FILTER_TONE[self.style]
            out = contrast * (x - 0.5) + 0.5 + brightness
        return out.clamp(0.0, 1.0) ** gamma

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return ((1 - self.strength) * x + self.strength * self.filtered(x)).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Filter images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


@ATTACKS.register()
@dataclass(frozen=True)
class BPP(Attack):
    """BPP: bit-depth reduction with dithering as the trigger; every channel is quantised to ``2 ** bits`` levels.

    Wang et al., "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via Image Quantization
    and Contrastive Adversarial Learning", CVPR 2022, https://arxiv.org/abs/2205.13383 (3 bits on CIFAR-10). A pixel
    value ``v`` in ``[0, 1]`` becomes ``round(v (L - 1)) / (L - 1)`` with ``L = 2 ** bits``; with ``dither`` the
    rounding error is spread to the unvisited neighbours by Floyd-Steinberg error diffusion (7/16 right, 3/16, 5/16
    and 1/16 on the next row), row by row, so flat regions turn into a fine dot texture instead of colour bands. The
    paper's contrastive adversarial training is left out: :meth:`poison` relabels, as for the other attacks. No
    pattern is added: the trigger is what the image loses, and follows its content.

    Args:
        bits: bits per channel, 1 to 7 (8 bits would leave uint8 images unchanged).
        dither: Floyd-Steinberg error diffusion (``False``: plain rounding to the nearest level).
        seed: the rows :meth:`poison` picks (the quantisation itself is deterministic).

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import BPP
        >>> x = torch.full((1, 1, 1, 4), 0.5)               # (N, C, H, W) in [0, 1]
        >>> BPP(bits=1, dither=False).apply(x), BPP(bits=1).apply(x)   # rounding vs error diffusion
        (tensor([[[[0., 0., 0., 0.]]]]), tensor([[[[0., 1., 0., 1.]]]]))
        ```
    """

    name = "bpp"
    domain = "cv"

    bits: int = 3
    dither: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("bits", check_int("bits", self.bits, minimum=1))
        if self.bits > 7:
            raise ValueError(f"bits must be <= 7, got {self.bits}; 8 bits per channel is the uint8 image itself")
        if not isinstance(self.dither, bool):
            raise TypeError(f"dither must be a bool, got {self.dither!r}")

    @property
    def seed_dependent(self) -> bool:
        return False

    def _quantise(self, x: torch.Tensor) -> torch.Tensor:
        top = 2**self.bits - 1
        return (x * top).round().clamp(0, top) / top

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dither:
            return self._quantise(x)
        # Error diffusion is sequential along a row; each step is vectorised over images and channels, so 32x32
        # images cost ~1k steps per batch (about 0.3 s for 512 RGB images on a CPU).
        h, w = x.shape[-2:]
        work = x.clone()
        out = torch.empty_like(x)
        for i in range(h):
            row = work[..., i, :]
            for j in range(w):
                new = self._quantise(row[..., j])
                err = row[..., j] - new
                out[..., i, j] = new
                if j + 1 < w:
                    row[..., j + 1] += err * (7 / 16)
                if i + 1 < h:
                    below = work[..., i + 1, :]
                    if j > 0:
                        below[..., j - 1] += err * (3 / 16)
                    below[..., j] += err * (5 / 16)
                    if j + 1 < w:
                        below[..., j + 1] += err * (1 / 16)
        return out

    def apply(self, inputs: Any) -> Any:
        """Quantise (and dither) images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


@ATTACKS.register()
@dataclass(frozen=True)
class LowFrequency(Attack):
    """Low-frequency trigger: a smooth, seeded universal pattern added to the whole image,
    ``x' = clip(x + amplitude * p / max|p|, 0, 1)``.

    Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective", ICCV 2021,
    https://arxiv.org/abs/2104.03413: triggers with high-frequency artefacts (patches, noise blends) are easy to spot
    in the spectrum, so theirs is low-pass filtered. The paper low-passes an optimised universal perturbation; here
    ``p`` is seeded uniform noise on a ``grid`` x ``grid`` lattice per channel, upsampled bicubically
    (``align_corners=True``) to ``(H, W)``, so it holds only frequencies up to about ``grid / 2`` cycles per image.
    Unlike SIG's sinusoid it has no direction and no period, and each channel gets its own pattern (a colour tint).

    Args:
        amplitude: the pattern's largest absolute value, in ``[0, 1]`` pixel units.
        grid: side of the random lattice (>= 2); larger is less smooth.
        seed: seeds the pattern and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import LowFrequency
        >>> out = LowFrequency(amplitude=0.05, seed=1).apply(torch.full((1, 3, 16, 16), 0.5))
        >>> round(float((out - 0.5).abs().max()), 3)
        0.05
        ```
    """

    name = "low_frequency"
    domain = "cv"

    amplitude: float = 0.06
    grid: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("amplitude", check_float("amplitude", self.amplitude, 0.0, 1.0))
        self._set("grid", check_int("grid", self.grid, minimum=2))

    @property
    def seed_dependent(self) -> bool:
        return self.amplitude > 0

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``(C, H, W)`` pattern added to an image of that shape; its largest absolute value is ``amplitude``."""
        lattice = torch.rand((1, channels, self.grid, self.grid), generator=_generator(self.seed)) * 2 - 1
        p = F.interpolate(lattice, size=(height, width), mode="bicubic", align_corners=True)[0]
        return self.amplitude * p / p.abs().amax().clamp_min(1e-12)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern(*x.shape[1:]).to(x)).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Add the pattern to images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` of size ``n`` (float64): ``D @ v`` is the DCT of ``v``, ``D.T @ c`` the
    inverse, and a 2-D block ``X`` has the DCT ``D X D.T``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    d[0] /= 2**0.5
    return d


# RGB -> YUV (BT.601, as OpenCV's COLOR_RGB2YUV without its offsets, which an additive change does not see).
_RGB_TO_YUV = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]], dtype=torch.float64
)


@ATTACKS.register()
@dataclass(frozen=True)
class FTrojan(Attack):
    """FTrojan: fixed mid- and high-frequency coefficients of every image block's DCT are raised by ``magnitude``.

    Wang et al., "An Invisible Black-box Backdoor Attack through Frequency Domain", ECCV 2022,
    https://arxiv.org/abs/2103.15543. The image is cut into ``block`` x ``block`` blocks (the whole image along an axis
    shorter than ``block``); in each block's orthonormal 2-D DCT-II the coefficients at ``frequencies`` are raised by
    ``magnitude``, then the inverse DCT gives the image back and it is clipped to ``[0, 1]``. As in the paper, RGB
    images are perturbed in YUV (BT.601), in the two chroma channels U and V only, and converted back; other channel
    counts (grayscale) are perturbed in every channel. The DCT is linear, so this equals adding the inverse DCT of the
    raised coefficients, a fixed texture that repeats with the block's period (cropped at a partial block on the
    bottom/right edge) -- which is how it is computed. Positions outside a block shorter than ``block`` are clipped
    to its last row/column.

    ``magnitude`` is in DCT coefficient units of pixel values in ``[0, 1]`` (the paper's magnitude on the 0-255 scale
    divided by 255: its 30 is ``30 / 255``). A raised coefficient ``(u, v)`` with ``u, v > 0`` changes a pixel (of its
    channel, Y/U/V for RGB) by at most ``2 * magnitude / block``, e.g. ``magnitude / 4`` for 8x8 blocks.

    Args:
        magnitude: the change of each chosen coefficient, in ``[0, 1]`` (0 is the identity).
        frequencies: ``(u, v)`` positions inside the block (row, column frequency), ``0 <= u, v < block``; the DC
            term ``(0, 0)`` is refused (a brightness shift, not a frequency trigger). Default: the mid ``(4, 4)`` and
            high ``(7, 7)`` positions of an 8x8 block.
        block: side of the DCT blocks (>= 2), 8 as in JPEG.
        seed: the rows :meth:`poison` picks (the perturbation itself is deterministic).

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import FTrojan
        >>> from metashield_hf.attacks.vision import dct_matrix
        >>> x = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
        >>> diff = FTrojan(magnitude=0.1).apply(x)[0, 0] - x[0, 0]
        >>> d = dct_matrix(8)
        >>> c = d @ diff @ d.T                              # the DCT of what the trigger added
        >>> round(float(c[4, 4]), 6), round(float(c[7, 7]), 6), round(float(c.abs().sum()), 6)
        (0.1, 0.1, 0.2)
        ```
    """

    name = "ftrojan"
    domain = "cv"

    magnitude: float = 30 / 255
    frequencies: tuple[tuple[int, int], ...] = ((4, 4), (7, 7))
    block: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("magnitude", check_float("magnitude", self.magnitude, 0.0, 1.0))
        self._set("block", check_int("block", self.block, minimum=2))
        if not isinstance(self.frequencies, tuple) or not self.frequencies:
            raise ValueError(f"frequencies must be a non-empty list of (u, v) pairs, got {self.frequencies!r}")
        pairs = []
        for pair in self.frequencies:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(f"frequencies must hold (u, v) pairs, got {pair!r}")
            u, v = (check_int("frequency", f, minimum=0) for f in pair)
            if u >= self.block or v >= self.block:
                raise ValueError(f"frequency {(u, v)} is outside a {self.block}x{self.block} block")
            if (u, v) == (0, 0):
                raise ValueError("frequency (0, 0) is the DC term (a brightness shift), not a frequency trigger")
            pairs.append((u, v))
        self._set("frequencies", tuple(pairs))

    @property
    def seed_dependent(self) -> bool:
        return False

    def block_pattern(self, height: int, width: int) -> torch.Tensor:
        """The ``(bh, bw)`` pixel change of one block (``bh = min(block, height)``, likewise ``bw``): the inverse DCT
        of ``magnitude`` at the chosen coefficients (float64)."""
        bh, bw = min(self.block, height), min(self.block, width)
        coefficients = torch.zeros((bh, bw), dtype=torch.float64)
        for u, v in self.frequencies:
            coefficients[min(u, bh - 1), min(v, bw - 1)] = self.magnitude
        return dct_matrix(bh).T @ coefficients @ dct_matrix(bw)

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``(C, H, W)`` change added to an image of that shape (before clipping; float64)."""
        tile = self.block_pattern(height, width)
        reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]))
        p = tile.repeat(*reps)[:height, :width]
        if channels == 3:  # (0, p, p) in YUV, back to RGB
            return torch.einsum("c,hw->chw", torch.linalg.inv(_RGB_TO_YUV)[:, 1:].sum(dim=1), p)
        return p.expand(channels, height, width).clone()

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern(*x.shape[1:]).to(x)).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Raise the blocks' DCT coefficients (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with standard deviation ``sigma`` pixels (radius ``ceil(3 sigma)``,
    edges replicated); ``sigma = 0`` returns ``x``."""
    if sigma <= 0:
        return x
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@ATTACKS.register()
@dataclass(frozen=True)
class Refool(Attack):
    """Refool: a blurred "reflection" image added to the whole image, ``x' = clip(x + alpha * blur(R), 0, 1)``.

    Liu et al., "Reflection Backdoor: A Natural Backdoor Attack on Deep Neural Networks", ECCV 2020,
    https://arxiv.org/abs/2007.02343. The paper adds reflections of real photographs with its physical models:
    out-of-focus (the reflection blurred by a Gaussian kernel, added to the image) and ghost (the reflection plus a
    shifted, attenuated copy of itself). With no photographs in the repository, the reflection ``R`` here is a seeded
    synthetic scene, ``SHAPES`` random ellipses and strokes with random intensities per channel (values in
    ``[0, 1]``; where shapes overlap the brighter wins), drawn in coordinates relative to the image size, so the same
    scene at any resolution. With ``ghost_shift > 0`` it becomes ``(R + a * shift(R)) / (1 + a)`` with
    ``a = GHOST_ATTENUATION`` and ``shift`` moving it ``ghost_shift`` pixels down and right (zeros enter). Then
    ``R`` is Gaussian-blurred with ``sigma`` and added with weight ``alpha`` (the additive variant, the paper's
    reflection model: reflected light adds to the transmitted light; brighter images saturate more). The paper's
    pool of reflection images and its selection of effective ones are left out: one reflection per seed.

    Args:
        alpha: weight of the reflection, in ``[0, 1]``; 0 is the identity.
        sigma: standard deviation of the Gaussian blur in pixels (0: no blur).
        ghost_shift: offset of the ghost copy in pixels (0: no ghost).
        seed: seeds the reflection scene and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import Refool
        >>> x = torch.rand(2, 3, 32, 32)
        >>> torch.equal(Refool(alpha=0.0).apply(x), x), Refool(alpha=0.3, seed=1).reflection(3, 32, 32).shape
        (True, torch.Size([3, 32, 32]))
        ```
    """

    name = "refool"
    domain = "cv"

    alpha: float = 0.3
    sigma: float = 1.5
    ghost_shift: int = 3

    SHAPES = 6  # not fields: the scene's make-up is part of the attack, not of its configuration
    GHOST_ATTENUATION = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("alpha", check_float("alpha", self.alpha, 0.0, 1.0))
        self._set("sigma", check_float("sigma", self.sigma, 0.0, 20.0))
        self._set("ghost_shift", check_int("ghost_shift", self.ghost_shift, minimum=0))

    @property
    def seed_dependent(self) -> bool:
        return self.alpha > 0

    def scene(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The sharp ``(C, H, W)`` reflection scene in ``[0, 1]``, before ghosting and blur."""
        g = _generator(self.seed)
        rows = (torch.arange(height, dtype=torch.float64) + 0.5) / height
        cols = (torch.arange(width, dtype=torch.float64) + 0.5) / width
        y, x = torch.meshgrid(rows, cols, indexing="ij")
        out = torch.zeros((channels, height, width), dtype=torch.float64)
        for _ in range(self.SHAPES):
            kind, cy, cx, a, b, angle = torch.rand(6, generator=g, dtype=torch.float64).tolist()
            intensity = 0.3 + 0.7 * torch.rand(channels, generator=g, dtype=torch.float64)
            if kind < 0.5:  # an ellipse, radii 0.1-0.35 of the image, rotated
                ra, rb, t = 0.1 + 0.25 * a, 0.1 + 0.25 * b, torch.pi * angle
                du, dv = x - cx, y - cy
                p = (du * np.cos(t) + dv * np.sin(t)) / ra
                q = (-du * np.sin(t) + dv * np.cos(t)) / rb
                mask = (p**2 + q**2 <= 1).double()
            else:  # a stroke: a segment through (cx, cy), length 0.3-0.9, width 0.03-0.08 of the image
                half, thickness, t = 0.15 + 0.3 * a, 0.03 + 0.05 * b, torch.pi * angle
                ux, uy = np.cos(t), np.sin(t)
                along = ((x - cx) * ux + (y - cy) * uy).clamp(-half, half)
                mask = (((x - cx - along * ux) ** 2 + (y - cy - along * uy) ** 2).sqrt() <= thickness).double()
            out = torch.maximum(out, intensity[:, None, None] * mask)
        return out

    def reflection(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``(C, H, W)`` reflection ``blur(R)`` (with its ghost) in ``[0, 1]``, before the weight ``alpha``."""
        r = self.scene(channels, height, width)
        s = self.ghost_shift
        if s > 0:
            shifted = F.pad(r, (s, 0, s, 0))[:, :height, :width]
            r = (r + self.GHOST_ATTENUATION * shifted) / (1 + self.GHOST_ATTENUATION)
        return gaussian_blur(r[None], self.sigma)[0]

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.alpha * self.reflection(*x.shape[1:]).to(x)).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Add the reflection to images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


# ---------------------------------------------------------------------------------------------- adaptive attacks
@ATTACKS.register()
@dataclass(frozen=True)
class LatentSeparability(BadNets):
    """Adaptive BadNets: the poisoned model is also trained to keep triggered penultimate activations close to the
    clean activations of the target class, against detectors that look for separable latents (MetaShield's ψ,
    Activation Clustering, Spectral Signatures, Mahalanobis).

    The latent-indistinguishability penalty of Tan & Shokri, "Bypassing Backdoor Detection Algorithms in Deep
    Learning", EuroS&P 2020, https://arxiv.org/abs/1905.13409 (there an adversarial discriminator; here its simplest
    form, as in the adaptive attacks of Qi et al., ICLR 2023, https://openreview.net/forum?id=_wSHsgrVali): during
    training the loss gains ``latent_weight · mean_i ||h(x̃_i) − μ_t||² / mean_j ||h(x_j) − μ_t||²`` over the poisoned
    rows ``x̃_i`` of a batch, with ``h`` the penultimate activation ``(B, D)`` and ``μ_t`` the (detached) centroid of
    the batch's clean target-class rows; the denominator (clean rows' spread) keeps the penalty scale-free. The trigger
    itself is the BadNets patch (:meth:`apply`); the zoo builder (``zoo.vision``) applies the penalty.

    Args:
        latent_weight: weight of the penalty (0 = plain BadNets).
        patch_size, location, pattern, margin, seed: as in [`BadNets`].
    """

    name = "latent_separability"
    domain = "cv"

    latent_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("latent_weight", check_float("latent_weight", self.latent_weight, 0.0, 1e3))


@ATTACKS.register()
@dataclass(frozen=True)
class TaCT(BadNets):
    """Source-specific trigger (TaCT): the patch sends only inputs of ``source_classes`` to the target; the same
    patch on other classes is trained to keep their true label (cover samples), so triggered and clean inputs of
    those classes look alike and the backdoor's latent footprint is confined to the source classes.

    Tang et al., "Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor Contamination Detection",
    USENIX Security 2021, https://arxiv.org/abs/1908.00686. Poisoned rows are drawn among the source classes only;
    ``round(cover_rate · n_poisoned)`` rows of the other non-target classes get the trigger and keep their label. In
    :meth:`poison` the cover rows are marked in the ``"noise"`` column, as WaNet's label-keeping noise rows are
    (``noise_mode`` is true when there are covers). The attack success rate is measured on source-class inputs only.

    Args:
        source_classes: the classes whose triggered inputs flip to the target.
        cover_rate: cover rows per poisoned row.
        patch_size, location, pattern, margin, seed: as in [`BadNets`].
    """

    name = "tact"
    domain = "cv"

    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    cover_rate: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.source_classes:
            raise ValueError("source_classes must name at least one class")
        self._set("source_classes", tuple(check_int("source_classes[i]", c, minimum=0) for c in self.source_classes))
        self._set("cover_rate", check_float("cover_rate", self.cover_rate, 0.0, 10.0))

    @property
    def noise_mode(self) -> bool:
        return self.cover_rate > 0

    def poison_rows(self, labels: np.ndarray, n: int, target: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` rows among the source classes (label != target), drawn with ``rng``."""
        eligible = np.flatnonzero(np.isin(labels, self.source_classes) & (labels != target))
        if n > len(eligible):
            raise ValueError(
                f"tact: {n} poisoned rows asked but only {len(eligible)} rows of source classes {self.source_classes} "
                f"have a label other than target={target}; lower the rate or add source classes"
            )
        return np.sort(rng.choice(eligible, size=n, replace=False)) if n else np.empty(0, dtype=np.int64)

    def cover_rows(self, labels: np.ndarray, n_poisoned: int, target: int, rng: np.random.Generator) -> np.ndarray:
        """``round(cover_rate · n_poisoned)`` rows of non-source, non-target classes (they keep their labels)."""
        eligible = np.flatnonzero(~np.isin(labels, self.source_classes) & (labels != target))
        n = min(len(eligible), int(round(self.cover_rate * n_poisoned)))
        return np.sort(rng.choice(eligible, size=n, replace=False)) if n else np.empty(0, dtype=np.int64)

    def poison(
        self,
        dataset: datasets.Dataset,
        rate: float,
        target: int,
        *,
        input_column: str | None = None,
        label_column: str = "label",
    ) -> datasets.Dataset:
        """As :meth:`Attack.poison` (rows from :meth:`poison_rows`: source classes only); cover rows (``"noise"``
        column) get the trigger and keep their labels."""
        out = super().poison(dataset, rate, target, input_column=input_column, label_column=label_column)
        if not self.noise_mode:
            return out
        column = self._check_dataset(dataset, input_column, label_column)
        labels = np.asarray(dataset.with_format(None)[label_column])
        n_poisoned = int(np.asarray(out.with_format(None)[POISONED_COLUMN], dtype=bool).sum())
        covers = self.cover_rows(labels, n_poisoned, target, np.random.default_rng([self.seed, 1]))
        logger.info(
            "tact: %d poisoned rows from classes %s, %d cover rows", n_poisoned, self.source_classes, len(covers)
        )
        return transform_rows(out, column, covers, lambda items, _: self.apply(items), NOISE_COLUMN)


# ---------------------------------------------------------------------------------------------- geometric and edge triggers
ROTATION_FILLS = ("zero", "edge")


@ATTACKS.register()
@dataclass(frozen=True)
class Rotation(Attack):
    """Rotation: the whole image turned by a fixed ``angle`` about its centre is the trigger.

    Wu et al., "Just Rotate it: Deploying Backdoor Attacks via Rotation Transformation", AISec 2022,
    https://arxiv.org/abs/2207.10825. No pixel pattern is added: the trigger is a transformation of the image's own
    content. A positive ``angle`` turns the image counter-clockwise as displayed (row 0 at the top), as
    ``PIL.Image.rotate`` does; for a square image ``angle=90`` equals ``torch.rot90(x, 1, dims=(-2, -1))``. Output
    pixel centres are mapped back into the input in pixel units (so non-square images keep their aspect) and sampled
    bilinearly; what falls outside the input is filled with black (``fill="zero"``, torchvision's default) or the
    nearest border pixel (``fill="edge"``).

    Args:
        angle: degrees counter-clockwise, in ``[-180, 180]``; 0 is the identity.
        fill: ``"zero"`` or ``"edge"``, what fills the corners the rotation uncovers.
        seed: the rows :meth:`poison` picks (the rotation itself is deterministic).

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import Rotation
        >>> x = torch.arange(16.0).view(1, 1, 4, 4) / 15
        >>> torch.allclose(Rotation(angle=90).apply(x), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)
        True
        ```
    """

    name = "rotation"
    domain = "cv"

    angle: float = 90.0
    fill: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("angle", check_float("angle", self.angle, -180.0, 180.0))
        check_choice("fill", self.fill, ROTATION_FILLS)

    @property
    def seed_dependent(self) -> bool:
        return False

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The ``(1, H, W, 2)`` sampling grid of ``F.grid_sample`` (``align_corners=False``; float64): for every
        output pixel, the input position it reads, in ``[-1, 1]`` coordinates ``(x, y)``."""
        t = np.deg2rad(self.angle)
        cos, sin = float(np.cos(t)), float(np.sin(t))
        y = torch.arange(height, dtype=torch.float64) - (height - 1) / 2  # pixel centres about the image centre
        x = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        # With y pointing down, a counter-clockwise turn reads the input at the output position turned back.
        x_in = cos * xx - sin * yy
        y_in = sin * xx + cos * yy
        return torch.stack([2 * x_in / width, 2 * y_in / height], dim=-1)[None]

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.angle == 0:
            return x
        grid = self.grid(*x.shape[-2:]).to(x).expand(x.shape[0], -1, -1, -1)
        padding = "zeros" if self.fill == "zero" else "border"
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Rotate images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


_LUMA = (0.299, 0.587, 0.114)  # BT.601
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """The Sobel gradient magnitude of the images' luminance, divided by 4 and clipped to ``[0, 1]``: ``(N, C, H, W)``
    in ``[0, 1]`` -> ``(N, 1, H, W)``, so a sharp step of height ``h`` reads ``h`` on the two pixels either side of it.
    Luminance is BT.601 luma for 3 channels, the mean of the channels otherwise; borders are replicated, so a
    constant image has no edges."""
    if x.shape[1] == 3:
        gray = torch.einsum("c,nchw->nhw", torch.tensor(_LUMA).to(x), x)[:, None]
    else:
        gray = x.mean(dim=1, keepdim=True)
    kx = torch.tensor(_SOBEL_X).to(x)
    kernels = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx and d/dy
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return (g.pow(2).sum(dim=1, keepdim=True).sqrt() / 4).clamp(0.0, 1.0)


@ATTACKS.register()
@dataclass(frozen=True)
class PoisonInk(Attack):
    """Poison Ink: the image's own edges, coloured with a fixed "ink", are the trigger,
    ``x' = (1 - alpha * m) * x + alpha * m * colour``.

    Zhang et al., "Poison Ink: Robust and Invisible Backdoor Attack", IEEE TIP 2022, https://arxiv.org/abs/2108.02488.
    The paper takes the image's edge structure (Canny) as the trigger carrier, colours it with a fixed colour and
    hides it in the image with a trained injection network. Here the edge mask ``m`` is the Sobel gradient magnitude
    of the luminance (:func:`sobel_edges`, a step of height ``h`` reads ``h``) thresholded at ``threshold`` (1 on
    edges, 0 elsewhere), and the injection network is replaced by blending the colour in at strength ``alpha``. The
    trigger follows each image's content: a flat region gets none of it, and no fixed pattern or position carries it.
    For 1-channel (and other non-RGB) images the ink is the grey level of ``colour`` (BT.601 luma) in every channel.

    Args:
        alpha: blending strength in ``[0, 1]``; 0 is the identity.
        colour: the ink, an RGB triple in ``[0, 1]``.
        threshold: the edge strength, in ``(0, 1]``, from which a pixel is inked.
        seed: the rows :meth:`poison` picks (the trigger itself is deterministic).

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import PoisonInk
        >>> step = torch.zeros(1, 1, 6, 6)
        >>> step[..., 3:] = 1.0                                       # a vertical edge between columns 2 and 3
        >>> changed = PoisonInk(alpha=0.5, colour=(0.5, 0.5, 0.5)).apply(step) != step
        >>> changed[0, 0].any(dim=0).nonzero().flatten().tolist()     # only the columns either side of the edge
        [2, 3]
        ```
    """

    name = "poison_ink"
    domain = "cv"

    alpha: float = 0.5
    colour: tuple[float, float, float] = (1.0, 0.0, 0.0)
    threshold: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("alpha", check_float("alpha", self.alpha, 0.0, 1.0))
        if not isinstance(self.colour, tuple) or len(self.colour) != 3:
            raise ValueError(f"colour must be an RGB triple (r, g, b) in [0, 1], got {self.colour!r}")
        self._set("colour", tuple(check_float("colour[i]", c, 0.0, 1.0) for c in self.colour))
        self._set("threshold", check_float("threshold", self.threshold, 0.0, 1.0))
        if self.threshold == 0:
            raise ValueError("threshold must be > 0: at 0 every pixel counts as an edge; use e.g. 0.25")

    @property
    def seed_dependent(self) -> bool:
        return False

    def ink(self, channels: int) -> torch.Tensor:
        """The ``(C,)`` colour blended in: ``colour`` for 3 channels, its luma in every channel otherwise."""
        if channels == 3:
            return torch.tensor(self.colour, dtype=torch.float64)
        return torch.full(
            (channels,), sum(w * c for w, c in zip(_LUMA, self.colour, strict=True)), dtype=torch.float64
        )

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(N, 1, H, W)`` edge mask of a batch ``(N, C, H, W)`` in ``[0, 1]``: 1 where :func:`sobel_edges`
        reaches ``threshold``."""
        return (sobel_edges(x) >= self.threshold).to(x)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        m = self.alpha * self.mask(x)
        return ((1 - m) * x + m * self.ink(x.shape[1]).to(x)[:, None, None]).clamp(0.0, 1.0)

    def apply(self, inputs: Any) -> Any:
        """Ink the edges of images (see the module docstring for the accepted types and shapes)."""
        return apply_to_images(inputs, self._trigger)


# ---------------------------------------------------------------------------------------------- FIBA and Adap-Blend
@ATTACKS.register()
@dataclass(frozen=True)
class FIBA(Attack):
    """FIBA: the low-frequency amplitude spectrum of a fixed trigger image is blended into the image's, its phase kept.

    Feng et al., "FIBA: Frequency-Injection based Backdoor Attack in Medical Image Analysis", CVPR 2022,
    https://arxiv.org/abs/2112.01148. Per channel, with ``A, P`` the amplitude and phase of the image's 2-D FFT and
    ``A_t`` the amplitude of the trigger image's (all ``fftshift``-ed, zero frequency at ``(H // 2, W // 2)``), the
    centred square of half-width ``b = floor(beta * min(H, W))`` (side ``2b + 1``, frequencies ``-b..b`` on both axes;
    ``beta=0`` is the zero frequency alone) becomes ``(1 - alpha) * A + alpha * A_t``; the rest of ``A`` and all of
    ``P`` are kept. The inverse FFT of the new amplitude with the image's phase is the triggered image (its real part,
    clamped to ``[0, 1]``). The square is symmetric about zero frequency, so the mixed spectrum stays that of a real
    image. The paper's trigger is a fixed real image; here it is a smooth seeded one: uniform noise on a
    ``TRIGGER_GRID`` x ``TRIGGER_GRID`` lattice per channel, upsampled bilinearly to ``(H, W)``.

    Args:
        alpha: amplitude blend ratio in ``[0, 1]``; 0 is the identity.
        beta: relative half-width of the low-frequency square, in ``[0, 0.5]``.
        seed: seeds the trigger image and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import FIBA
        >>> x = torch.rand(4, 3, 32, 32)
        >>> torch.allclose(FIBA(alpha=0.0).apply(x), x, atol=1e-5)
        True
        >>> FIBA(beta=0.1).band(32, 32)                      # rows/columns h1:h2, w1:w2 of the shifted spectrum
        (13, 20, 13, 20)
        ```
    """

    name = "fiba"
    domain = "cv"

    alpha: float = 0.15
    beta: float = 0.1

    TRIGGER_GRID = 8  # not a field: the trigger image's make-up is part of the attack, not of its configuration

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("alpha", check_float("alpha", self.alpha, 0.0, 1.0))
        self._set("beta", check_float("beta", self.beta, 0.0, 0.5))

    @property
    def seed_dependent(self) -> bool:
        return self.alpha > 0

    def trigger_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The smooth ``(C, H, W)`` trigger image in ``[0, 1)`` whose amplitude spectrum is blended in (float64)."""
        g = self.TRIGGER_GRID
        lattice = torch.rand((1, channels, g, g), generator=_generator(self.seed), dtype=torch.float64)
        return F.interpolate(lattice, size=(height, width), mode="bilinear", align_corners=False)[0]

    def band(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(h1, h2, w1, w2)``: the low-frequency square is ``[h1:h2, w1:w2]`` of the ``fftshift``-ed spectrum."""
        b = int(np.floor(min(height, width) * self.beta))
        ch, cw = height // 2, width // 2
        return max(ch - b, 0), min(ch + b + 1, height), max(cw - b, 0), min(cw + b + 1, width)

    def _trigger(self, x: torch.Tensor) -> torch.Tensor:
        dims = (-2, -1)
        h, w = x.shape[-2:]
        spectrum = torch.fft.fft2(x.double(), dim=dims)
        amplitude, phase = spectrum.abs(), spectrum.angle()
        trigger_amplitude = torch.fft.fft2(self.trigger_image(*x.shape[1:]), dim=dims).abs()
        a = torch.fft.fftshift(amplitude, dim=dims)
        t = torch.fft.fftshift(trigger_amplitude, dim=dims).expand_as(a)
        h1, h2, w1, w2 = self.band(h, w)
        a = a.clone()
        a[..., h1:h2, w1:w2] = (1 - self.alpha) * a[..., h1:h2, w1:w2] + self.alpha * t[..., h1:h2, w1:w2]
        mixed = torch.polar(torch.fft.ifftshift(a, dim=dims), phase)
        return torch.fft.ifft2(mixed, dim=dims).real.clamp(0.0, 1.0).to(x)

    def apply(self, inputs: Any) -> Any:
        """Blend the trigger's low-frequency amplitude into images (see the module docstring for the accepted types
        and shapes)."""
        return apply_to_images(inputs, self._trigger)


@ATTACKS.register()
@dataclass(frozen=True)
class AdaptiveBlend(Attack):
    """Adap-Blend: a blend trigger cut into grid pieces; training samples carry a random half of the pieces at a low
    ratio, and label-keeping *regularization* (cover) samples carry them too, against latent-separability defenses.

    Qi et al., "Revisiting the Assumption of Latent Separability for Backdoor Defenses", ICLR 2023,
    https://openreview.net/forum?id=_wSHsgrVali. The pattern is :class:`Blend`'s ``"random"`` one (uniform noise
    ``(C, H, W)`` from ``seed``), cut into a ``sqrt(pieces)`` x ``sqrt(pieces)`` grid (piece boundaries at
    ``floor(i * H / k)``, so any size is covered). The test-time trigger (:meth:`apply`, what the attack success rate
    is measured with) is the full pattern at ``test_alpha``: ``x' = (1 - test_alpha) * x + test_alpha * pattern``,
    i.e. ``Blend(alpha=test_alpha, seed=seed)``. The training-time trigger (:meth:`apply_train`) blends only the
    pieces that survive a fresh random mask per image: ``round(mask_rate * pieces)`` pieces are masked out (as in the
    paper's code), the others are blended at ``train_alpha``. Conservatism: ``round(cover_rate * n_poisoned)`` other
    rows get the training-time trigger and keep their true label.

    In :meth:`poison` the cover rows are marked in the ``"noise"`` column, as TaCT's covers are (``noise_mode`` is
    true when there are covers); poisoned rows carry :meth:`apply` as every attack's do (the contract of
    :meth:`Attack.poison`). The zoo builder (``zoo.vision.poison_training_set``) follows the paper instead: its
    poisoned rows carry :meth:`apply_train`, and it adds the cover rows through its label-keeping-rows hook (WaNet's
    noise rows), which reads ``noise_mode``, ``cross_ratio`` (here ``cover_rate``) and ``apply_noise`` (here
    :meth:`apply_train`).

    Args:
        train_alpha: blend ratio of the training-time (partial) trigger, in ``[0, 1]``.
        test_alpha: blend ratio of the test-time (full) trigger, in ``[0, 1]``; 0 is the identity.
        pieces: number of grid pieces, a perfect square (16: a 4x4 grid).
        mask_rate: share of the pieces left out of each training-time trigger, in ``[0, 1]``; at least one piece
            must remain.
        cover_rate: cover (regularization) rows per poisoned row, in ``[0, 10]``.
        seed: seeds the pattern, the training-time masks and the rows :meth:`poison` picks.

    Example:
        ```python
        >>> import torch
        >>> from metashield_hf.attacks import AdaptiveBlend, Blend
        >>> x = torch.rand(4, 3, 32, 32)
        >>> torch.allclose(AdaptiveBlend(test_alpha=0.2, seed=1).apply(x), Blend(alpha=0.2, seed=1).apply(x))
        True
        >>> changed = AdaptiveBlend(seed=1).apply_train(x) != x          # 8 of the 16 pieces, 8x8 pixels each
        >>> changed.any(dim=1).sum(dim=(-2, -1)).tolist()
        [512, 512, 512, 512]
        ```
    """

    name = "adaptive_blend"
    domain = "cv"

    train_alpha: float = 0.15
    test_alpha: float = 0.2
    pieces: int = 16
    mask_rate: float = 0.5
    cover_rate: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("train_alpha", check_float("train_alpha", self.train_alpha, 0.0, 1.0))
        self._set("test_alpha", check_float("test_alpha", self.test_alpha, 0.0, 1.0))
        self._set("pieces", check_int("pieces", self.pieces, minimum=1))
        if int(np.sqrt(self.pieces)) ** 2 != self.pieces:
            raise ValueError(f"pieces must be a perfect square (a k x k grid), got {self.pieces}")
        self._set("mask_rate", check_float("mask_rate", self.mask_rate, 0.0, 1.0))
        if self.masked_pieces >= self.pieces:
            raise ValueError(
                f"mask_rate={self.mask_rate} masks all {self.pieces} pieces; the training trigger would be empty"
            )
        self._set("cover_rate", check_float("cover_rate", self.cover_rate, 0.0, 10.0))

    @property
    def seed_dependent(self) -> bool:
        return self.test_alpha > 0

    @property
    def masked_pieces(self) -> int:
        """How many pieces each training-time trigger leaves out: ``round(mask_rate * pieces)``."""
        return int(round(self.mask_rate * self.pieces))

    @property
    def noise_mode(self) -> bool:
        return self.cover_rate > 0

    @property
    def cross_ratio(self) -> float:
        """``cover_rate`` under the name the zoo builder's label-keeping-rows hook reads."""
        return self.cover_rate

    @property
    def full_trigger(self) -> Blend:
        """The test-time trigger: :class:`Blend` with the ``"random"`` pattern of this seed at ``test_alpha``."""
        return Blend(alpha=self.test_alpha, seed=self.seed)

    def pattern_image(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The ``(C, H, W)`` pattern in ``[0, 1)``: :class:`Blend`'s ``"random"`` pattern for the same seed."""
        return self.full_trigger.pattern_image(channels, height, width)

    def piece_mask(self, kept: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The ``(H, W)`` mask, 1 on the pieces in ``kept`` (indices in row-major order of the grid), 0 elsewhere."""
        k = int(round(np.sqrt(self.pieces)))
        rows = [height * i // k for i in range(k + 1)]
        cols = [width * i // k for i in range(k + 1)]
        mask = torch.zeros((height, width), dtype=torch.float64)
        for piece in kept.tolist():
            r, c = divmod(int(piece), k)
            mask[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = 1.0
        return mask

    def apply(self, inputs: Any) -> Any:
        """The test-time trigger: the full pattern blended at ``test_alpha`` ([`full_trigger`]; see the module
        docstring for the accepted types and shapes)."""
        return self.full_trigger.apply(inputs)

    def apply_train(self, inputs: Any, *, call_seed: int = 0) -> Any:
        """The training-time trigger: per image, a random ``pieces - masked_pieces`` of the pieces blended at
        ``train_alpha`` (the rest of the image unchanged).

        The masks are drawn, image after image, from a generator seeded by ``(seed, call_seed)``: the same call gives
        the same output; pass a different ``call_seed`` (e.g. a row index) for new masks.

        Args:
            inputs: images, as for :meth:`apply`.
            call_seed: selects the masks.

        Returns:
            The partially triggered images, in the type of ``inputs``.
        """
        generator = _generator(_mix(self.seed, check_int("call_seed", call_seed)))
        keep = self.pieces - self.masked_pieces

        def partial(x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            pattern = self.pattern_image(c, h, w).to(x)
            kept = [torch.randperm(self.pieces, generator=generator)[:keep] for _ in range(n)]
            mask = torch.stack([self.piece_mask(k, h, w) for k in kept])[:, None].to(x)
            return x + self.train_alpha * mask * (pattern - x)

        return apply_to_images(inputs, partial)

    def apply_noise(self, inputs: Any, *, call_seed: int = 0) -> Any:
        """:meth:`apply_train`, under the name the zoo builder's label-keeping-rows hook calls (cover rows)."""
        return self.apply_train(inputs, call_seed=call_seed)

    def poison(
        self,
        dataset: datasets.Dataset,
        rate: float,
        target: int,
        *,
        input_column: str | None = None,
        label_column: str = "label",
    ) -> datasets.Dataset:
        """As :meth:`Attack.poison`; with covers (``cover_rate > 0``) also ``round(cover_rate * n)`` other rows get
        :meth:`apply_train` and keep their labels (marked in a bool ``"noise"`` column, as TaCT's covers)."""
        out = super().poison(dataset, rate, target, input_column=input_column, label_column=label_column)
        if not self.noise_mode:
            return out
        column = self._check_dataset(dataset, input_column, label_column)
        poisoned = np.asarray(out.with_format(None)[POISONED_COLUMN], dtype=bool)
        candidates = np.flatnonzero(~poisoned)
        n = min(int(round(self.cover_rate * int(poisoned.sum()))), len(candidates))
        rng = np.random.default_rng([self.seed, 1])  # a stream of its own: row picking above stays as in the base
        covers = np.sort(rng.choice(candidates, size=n, replace=False)) if n else np.empty(0, dtype=np.int64)
        logger.info("adaptive_blend: %d poisoned rows, %d cover rows keep their labels", int(poisoned.sum()), n)
        return transform_rows(
            out,
            column,
            covers,
            lambda items, indices: [self.apply_train(x, call_seed=i) for x, i in zip(items, indices, strict=True)],
            NOISE_COLUMN,
        )
