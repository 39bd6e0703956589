"""Trigger inversion in feature space: per class, the smallest shift of an intermediate layer's output that sends the
clean samples to that class.

A trigger that is a transformation of the input (a colour filter, a sinusoid, a warp) has no small input-space mask to
find, but whatever its shape the backdoored model maps it to a few directions of its intermediate features that lead
to the target class. FeatureRE (Wang et al., "Rethinking the Reverse-engineering of Trojan Triggers", NeurIPS 2022,
https://arxiv.org/abs/2210.15127), UNICORN (Wang et al., ICLR 2023, https://arxiv.org/abs/2304.02786) and BTI-DBF (Xu
et al., "Towards Reliable and Efficient Backdoor Trigger Inversion via Decoupling Benign Features", ICLR 2024,
https://openreview.net/forum?id=Tw9wemV6cb) therefore invert the trigger at an intermediate layer, constrained to
keep the rest of the feature intact. Here the trigger is an additive shift ``δ_t`` of one block's output (the same for
every clean sample), and its size is its norm relative to the clean features' spread: a backdoor target is reached by
an abnormally short shift, so the smallest relative norm of that class is an outlier on the small side of the classes'
(Neural Cleanse's anomaly index, [`anomaly_indices`]). A shift keeps the rest of the feature intact in the simplest
sense: it moves every sample by the same small vector.

The shift's norm ``r`` (in units of the spread) tracks the flip threshold: it shrinks by a factor after a step whose
shift flips at least ``flip_threshold`` of the clean samples (those not already of the class) and grows after one that
does not, the factor narrowing from 1.5 towards 1, while Adam turns the shift's direction towards the class
(cross-entropy at the current norm). A class's size is the smallest norm whose shift flipped enough samples, as the
input synthesis records the smallest effective mask. Every family works through its target adapter: the block is one
of [`TargetAdapter.layer_blocks`] (the layer trajectory's blocks; a fraction ``depth`` of the way through them), and
the samples run through the scan's synthesis space ([`synthesis_space`]) with an empty mask, so tokenization and
preprocessing are untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..targets.base import TargetAdapter
from .progress import tqdm_disable
from .synthesis import SynthesisSpace, anomaly_indices, synthesis_space

logger = logging.getLogger(__name__)

__all__ = ["FeatureInversionResult", "feature_block", "invert_features"]


@dataclass
class FeatureInversionResult:
    """Per-class outcome of [`invert_features`] (``K`` classes).

    Attributes:
        sizes: ``(K,)`` the smallest relative norm ``||δ_t|| / spread`` at which the shift flipped at least
            ``flip_threshold`` of the clean samples to class ``t``; ``max_norm`` where it never did.
        reached: ``(K,)`` whether the flip threshold was reached.
        flip_rates: ``(K,)`` the flip rate at the recorded size (at ``max_norm`` where it was not reached).
        anomaly: ``(K,)`` Neural Cleanse's anomaly index of the sizes (large = abnormally easy to reach).
        layer: the name of the shifted block; spread: the clean features' spread (the RMS distance of a clean
            sample's block output from their mean) that the sizes are relative to.
        steps: the sweep's length.
    """

    sizes: np.ndarray
    reached: np.ndarray
    flip_rates: np.ndarray
    anomaly: np.ndarray
    layer: str
    spread: float
    steps: int


def feature_block(adapter: TargetAdapter, depth: float) -> tuple[str, nn.Module]:
    """The block a fraction ``depth`` (0: the first, 1: the last) of the way through [`TargetAdapter.layer_blocks`]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (the fraction of the way through the blocks), got {depth}")
    blocks = adapter.layer_blocks()
    if not blocks:
        raise ValueError(
            f"{type(adapter.model).__name__} has no blocks to invert a trigger at (TargetAdapter.layer_blocks() is "
            "empty); turn the feature inversion off with feature_steps=0"
        )
    return blocks[round(depth * (len(blocks) - 1))]


def _first_tensor(output) -> torch.Tensor:
    """The block's output tensor: the output itself, or the first element of a tuple (transformers' layers)."""
    x = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cannot shift a block output of type {type(output).__name__}; expected a tensor or a tuple")
    return x


@contextmanager
def _shifted(module: nn.Module, holder: dict) -> Iterator[dict]:
    """While inside the ``with`` block, ``module``'s output gets ``holder["shift"]`` added (where set) and is kept as
    ``holder["output"]`` (before the shift)."""

    def hook(_m, _args, output):
        x = _first_tensor(output)
        holder["output"] = x
        shift = holder.get("shift")
        if shift is None:
            return None
        y = (x.float() + shift.to(x.device)).to(x.dtype)
        return y if isinstance(output, torch.Tensor) else type(output)((y, *output[1:]))

    handle = module.register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


def _unit_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The shape of one shift: a whole sample's output (``(C, H, W)``, ``(D,)``), or one token's (``(1, H)``) for a
    token sequence ``(B, T, H)``, whose length varies between batches."""
    return (1, x.shape[-1]) if x.dim() == 3 else tuple(x.shape[1:])


def _identity(space: SynthesisSpace, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and pattern rows of an empty mask: ``k`` copies of the clean samples as they are."""
    n = space.num_samples
    return (
        torch.zeros((k * n, *space.mask_shape[1:]), device=space.device),
        torch.zeros((k * n, *space.pattern_shape[1:]), device=space.device),
    )


def _invert(
    space: SynthesisSpace,
    holder: dict,
    spread: float,
    classes: torch.Tensor,
    directions: torch.Tensor,
    valid: torch.Tensor,
    bar,
    *,
    steps: int,
    lr: float,
    flip_threshold: float,
    norm: float,
    min_norm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of classes: ``(reached, smallest effective relative norm (inf where none), flip rate)``.

    The norm tracks the flip threshold: it shrinks by a factor after a step whose shift flips enough samples and grows
    after one whose shift does not, the factor narrowing from 1.5 towards 1 over the steps, so Adam turns the
    direction at the norm where the class starts to be reached.
    """
    k, n = len(classes), space.num_samples
    view = [1] * (directions.dim() - 1)
    target = classes.repeat_interleave(n)
    weight = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
    v = directions.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr, betas=(0.5, 0.9))
    radius = torch.full((k,), float(norm))
    best, best_flip, last_flip = torch.full((k,), float("inf")), torch.zeros(k), torch.zeros(k)
    for step in range(steps):
        with torch.enable_grad():
            unit_dir = v / v.reshape(k, -1).norm(dim=1).clamp_min(1e-12).view(k, *view)
            holder["shift"] = (spread * radius.view(k, *view) * unit_dir).repeat_interleave(n, 0)
            logits = space.run(*_identity(space, k), k)[0].float().cpu()
            ce = nn.functional.cross_entropy(logits, target, reduction="none").view(k, n)
            # autograd.grad, not backward(): the model's own parameters must not accumulate .grad
            (v.grad,) = torch.autograd.grad((ce * weight).sum(), [v])
        holder["shift"] = None
        opt.step()
        hit = (logits.detach().argmax(-1) == target).float().view(k, n)
        flip = (hit * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        enough = flip >= flip_threshold
        better = enough & (radius < best)
        best, best_flip = torch.where(better, radius, best), torch.where(better, flip, best_flip)
        factor = 1.5 ** (1.0 - step / steps)
        radius = torch.where(enough, radius / factor, radius * factor).clamp_min(min_norm)
        last_flip = flip
        bar.update()
    ok = torch.isfinite(best)
    return ok, best, torch.where(ok, best_flip, last_flip)


def invert_features(
    adapter: TargetAdapter,
    items: list,
    clean_pred: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 20,
    depth: float = 0.5,
    lr: float = 0.2,
    flip_threshold: float = 0.9,
    norm: float = 1.0,
    min_norm: float = 0.01,
    max_norm: float = 10.0,
    class_batch: int = 16,
    seed: int = 0,
    progress: bool | None = None,
) -> FeatureInversionResult:
    """Per class ``t``, the smallest shift of an intermediate block's output that flips the clean samples to ``t``.

    Args:
        adapter: the target (any family with blocks, see [`feature_block`]).
        items: the clean items.
        clean_pred: ``(N,)`` the model's predictions on them (samples already of ``t`` do not count for ``t``).
        num_classes: ``K``.
        steps: Adam steps per class (``class_batch * N`` rows per forward pass).
        depth: which block, as a fraction of the way through [`TargetAdapter.layer_blocks`].
        lr: Adam's learning rate on the shift's direction (normalised to a unit vector before each step).
        flip_threshold: the fraction of the clean samples a shift must flip to count.
        norm: the starting norm, in units of the clean features' spread.
        min_norm: the smallest norm tried.
        max_norm: the size recorded for a class no shift reached.
        class_batch: classes shifted in one forward pass.
        seed: seeds the initial directions.
        progress: a tqdm bar over the steps (``None``: only when stderr is a terminal).

    Returns:
        A [`FeatureInversionResult`] with per-class relative norms, flip rates and their anomaly index.

    Example:
        ```python
        >>> adapter = load_target(model)
        >>> items = list(clean_images[:20])
        >>> result = invert_features(adapter, items, adapter(items).logits.argmax(-1), adapter.num_classes)
        >>> int(result.sizes.argmin()), result.layer
        (0, 'features.5')
        ```
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < min_norm <= norm <= max_norm:
        raise ValueError(f"need 0 < min_norm <= norm <= max_norm, got {min_norm}, {norm}, {max_norm}")
    name, block = feature_block(adapter, depth)
    space = synthesis_space(adapter, items)
    with torch.no_grad(), _shifted(block, {}) as holder:
        space.run(*_identity(space, 1), 1)
    if "output" not in holder:
        raise RuntimeError(f"block {name} did not run in the forward pass; nothing to invert there")
    clean = holder["output"].detach().float().cpu()
    unit = _unit_shape(clean)
    flat = clean.reshape(-1, int(np.prod(unit)))  # one row per sample (per token for sequences)
    spread = float((flat - flat.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-8))
    directions = torch.randn((num_classes, *unit), generator=torch.Generator().manual_seed(seed))
    valid = (clean_pred.cpu()[None, :] != torch.arange(num_classes)[:, None]).float()  # (K, N)
    sizes, flips = torch.empty(num_classes), torch.empty(num_classes)
    reached = torch.zeros(num_classes, dtype=torch.bool)
    total = steps * -(-num_classes // class_batch)
    bar = tqdm(total=total, desc="feature inversion", unit="step", disable=tqdm_disable(progress))
    settings = dict(steps=steps, lr=lr, flip_threshold=flip_threshold, norm=norm, min_norm=min_norm)
    with bar, _shifted(block, {}) as holder:
        for a in range(0, num_classes, class_batch):
            classes = torch.arange(a, min(a + class_batch, num_classes))
            got = _invert(space, holder, spread, classes, directions[classes], valid[classes], bar, **settings)
            sizes[classes] = torch.where(got[0], got[1], torch.full((len(classes),), float(max_norm)))
            reached[classes], flips[classes] = got[0], got[2]
    sizes_np = sizes.numpy().astype(np.float64)
    return FeatureInversionResult(
        sizes=sizes_np,
        reached=reached.numpy(),
        flip_rates=flips.numpy().astype(np.float64),
        anomaly=anomaly_indices(sizes_np),
        layer=name,
        spread=spread,
        steps=steps,
    )
