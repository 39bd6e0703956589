"""Input perturbations per modality, what the live probes send through a target adapter.

The probes in `metashield_hf.probes` never look at an input's domain: they ask the adapter
(``TargetAdapter.prepare_items`` / ``TargetAdapter.perturb``) for perturbed copies, and this module is where each
modality says what a perturbation means:

| kind | image (float ``(C, H, W)`` in ``[0, 1]``) | tensor (plain torch inputs) | text |
|---|---|---|---|
| ``superimpose`` | ``clip(x + alpha·overlay, 0, 1)`` (STRIP's saturating sum) | the same sum, clipped to the clean range | ``text_mode="splice"``: each overlay word inserted with probability ``text_mix`` at a random place, every input word kept; ``"replace"``: each input word replaced with probability ``text_mix`` by an overlay word (STRIP's text) |
| ``amplify`` | ``clip(factor·x, 0, 1)`` (SCALE-UP) | ``clip(factor·x, low, high)`` | not defined (raises) |
| ``augment`` | a shift of up to ``H/16`` pixels (edges replicated) plus noise of 1% of the range | noise of 2% of the clean range | one word dropped (texts of 4+ words), else two neighbours swapped |

``augment`` makes label-preserving, near-clean copies: what the shield calibrates its threshold on besides the clean
samples themselves (``adapt(..., calibration_copies=)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PERTURBATIONS",
    "TEXT_MODES",
    "InputRange",
    "amplify",
    "augment",
    "mix_words",
    "splice_words",
    "superimpose",
]

PERTURBATIONS = ("superimpose", "amplify", "augment")
TEXT_MODES = ("splice", "replace")


@dataclass(frozen=True)
class InputRange:
    """The value range perturbed tensors are clipped to (images: ``[0, 1]``; plain tensors: what the clean inputs
    span)."""

    low: float = 0.0
    high: float = 1.0

    @classmethod
    def of(cls, items: list[torch.Tensor]) -> InputRange:
        return cls(min(float(x.min()) for x in items), max(float(x.max()) for x in items))


def mix_words(text: str, other: str, rate: float, rng: np.random.Generator) -> str:
    """Text superimposition: each word of ``text`` is replaced, with probability ``rate``, by a word of ``other``.

    A one-word text stays a one-word text; an empty overlay leaves the text as it is.

    Example:
        ```python
        >>> mix_words("a b c", "x", 1.0, np.random.default_rng(0))
        'x x x'
        ```
    """
    words, pool = text.split(), other.split()
    if not words or not pool:
        return text if words else other
    swap = rng.random(len(words)) < rate
    picks = rng.integers(len(pool), size=len(words))
    return " ".join(pool[j] if s else w for w, s, j in zip(words, swap, picks, strict=True))


def splice_words(text: str, other: str, rate: float, rng: np.random.Generator) -> str:
    """Text superimposition that deletes nothing: each word of ``other`` is inserted, with probability ``rate``, at a
    random place of ``text``; every word of ``text`` stays, in order.

    Replacing words (`mix_words`) can delete a trigger token, and a triggered input whose trigger is gone behaves like
    a clean one; splicing keeps the trigger, so only a clean input's prediction is diluted by the overlay.

    Example:
        ```python
        >>> splice_words("a b", "x", 1.0, np.random.default_rng(0)).split().count("x")
        1
        ```
    """
    words = text.split()
    picks = [w for w in other.split() if rng.random() < rate]
    for w in picks:
        words.insert(int(rng.integers(len(words) + 1)), w)
    return " ".join(words)


def superimpose(
    modality: str,
    x,
    overlay,
    rng: np.random.Generator,
    *,
    alpha: float = 1.0,
    text_mix: float = 0.5,
    text_mode: str = "splice",
    bounds: InputRange = InputRange(),
):
    """One superimposed copy of the prepared input ``x`` with the prepared clean input ``overlay``.

    ``text_mode`` chooses how text is superimposed: ``"splice"`` ([`splice_words`]) or ``"replace"``
    ([`mix_words`]); ``text_mix`` is the probability per word.
    """
    if modality == "text":
        if text_mode not in TEXT_MODES:
            raise ValueError(f"unknown text_mode {text_mode!r}; choose from {TEXT_MODES}")
        return (splice_words if text_mode == "splice" else mix_words)(x, overlay, text_mix, rng)
    if modality == "image" and overlay.shape[-2:] != x.shape[-2:]:
        overlay = torch.nn.functional.interpolate(overlay[None], size=x.shape[-2:], mode="bilinear")[0]
    if overlay.shape != x.shape:
        raise ValueError(
            f"superimpose: input of shape {tuple(x.shape)} but a clean input of shape {tuple(overlay.shape)}"
        )
    return (x + alpha * overlay).clamp(bounds.low, bounds.high)


def amplify(modality: str, x, factor: float, *, bounds: InputRange = InputRange()):
    """``x`` with every value multiplied by ``factor``, clipped to ``bounds`` (SCALE-UP's pixel amplification)."""
    if modality == "text":
        raise NotImplementedError("input amplification is defined for images and tensors, not for text")
    return (x * factor).clamp(bounds.low, bounds.high)


def augment(modality: str, x, rng: np.random.Generator, *, bounds: InputRange = InputRange()):
    """One mild, label-preserving copy of the prepared input ``x``: a near-clean input for threshold calibration.

    Images are shifted by up to ``max(1, H // 16)`` pixels in each direction (edges replicated) with Gaussian noise of
    1% of the value range; plain tensors get noise of 2% of the clean range; a text of four or more words loses one
    word at random, a shorter one has two neighbouring words swapped (a one-word text stays as it is).

    Example:
        ```python
        >>> augment("text", "a b c d", np.random.default_rng(0)).count(" ")
        2
        ```
    """
    if modality == "text":
        words = x.split()
        if len(words) >= 4:
            del words[int(rng.integers(len(words)))]
        elif len(words) >= 2:
            i = int(rng.integers(len(words) - 1))
            words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    span = bounds.high - bounds.low
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    if modality == "image" and x.dim() >= 2:
        h, w = x.shape[-2:]
        r = max(1, h // 16)
        dy, dx = (int(v) for v in rng.integers(-r, r + 1, size=2))
        flat = x.reshape(-1, 1, h, w)
        padded = torch.nn.functional.pad(flat, (r, r, r, r), mode="replicate")
        x = padded[..., r + dy : r + dy + h, r + dx : r + dx + w].reshape(x.shape)
        noise = 0.01
    else:
        noise = 0.02
    x = x + noise * span * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x.clamp(bounds.low, bounds.high)
