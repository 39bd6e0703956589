"""Trigger synthesis without triggered examples: per-class mask + pattern reverse engineering (DESIGN §2.6).

For every class ``t`` a small *universal* perturbation is optimised that flips the clean samples to ``t``, in the
Neural Cleanse form ``x' = (1 - m) * x + m * p`` (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", S&P 2019, https://doi.org/10.1109/SP.2019.00031). A backdoored model has a shortcut to its
target class, so the smallest effective mask of that class is an outlier on the small side; the anomaly index
(median absolute deviation across classes) measures it.

Where the perturbation lives is domain-agnostic and comes from the target adapter:

- image models (transformers, timm, plain torch on image tensors): the *preprocessed* pixels ``(N, C, H, W)``; the
  mask is shared by the channels ``(1, 1, H, W)``, the pattern ``(1, C, H, W)`` stays inside the clean batch's
  per-channel value range;
- text models (transformers, PEFT): the output of ``get_input_embeddings()`` (a forward hook), so tokenization is
  untouched; the mask and pattern live on the hidden dimensions ``(1, 1, H)`` and apply to every non-padding token,
  and the pattern stays inside the per-dimension range of the embedding matrix;
- other float tensors ``(N, *S)``: mask ``(1, 1, *S[1:])`` (or ``(1, *S)`` for vectors).

An adapter can provide its own space with a ``synthesis_space(items) -> SynthesisSpace`` method.

All classes are optimised at once (batched as ``K * N`` rows) with Adam and Neural Cleanse's adaptive size penalty.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .targets.base import TargetAdapter, _to_device
from .targets.heads import select_tokens
from .targets.transformers_models import unwrap

logger = logging.getLogger(__name__)

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the standard deviation for normal data


@dataclass
class SynthesisSpace:
    """Where triggers are synthesised for one batch of clean samples.

    Attributes:
        run: ``run(mask_rows, pattern_rows) -> (logits (K*N, C), penultimate (K*N, D))``, differentiable; row ``r``
            of the batch is clean sample ``r % N`` perturbed by ``mask_rows[r]``/``pattern_rows[r]`` (``repeats``
            copies of the clean batch are run).
        num_samples: ``N``.
        mask_shape / pattern_shape: shapes of one class's mask and pattern (leading 1).
        low / high: bounds of the pattern, broadcastable to ``pattern_shape``.
        kind: ``"pixels"``, ``"embeddings"`` or ``"tensor"`` (for reports).
        device: where ``run`` wants the mask and pattern rows.
    """

    run: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    num_samples: int
    mask_shape: tuple[int, ...]
    pattern_shape: tuple[int, ...]
    low: torch.Tensor
    high: torch.Tensor
    kind: str
    device: torch.device = torch.device("cpu")


@dataclass
class SynthesisResult:
    """Per-class outcome of [`synthesize_triggers`] (``K`` classes).

    Attributes:
        sizes: ``(K,)`` smallest mask size (fraction of the mask's entries, ``mean(m)``) at which at least
            ``flip_threshold`` of the clean samples were flipped; the final size where that never happened.
        reached: ``(K,)`` whether the flip threshold was reached.
        flip_rates: ``(K,)`` flip rate of the recorded mask.
        masks / patterns: the recorded masks ``(K, *mask_shape[1:])`` and patterns.
        logits / penultimate: the target's outputs on the perturbed clean samples, ``(K, N, C)`` / ``(K, N, D)``.
    """

    sizes: np.ndarray
    reached: np.ndarray
    flip_rates: np.ndarray
    masks: torch.Tensor
    patterns: torch.Tensor
    logits: torch.Tensor
    penultimate: torch.Tensor
    kind: str
    steps: int
    history: list[float] = field(default_factory=list)


@contextmanager
def _head_capture(module: nn.Module) -> Iterator[dict]:
    """Like ``capture_penultimate`` but keeps the autograd graph (the synthesis needs gradients through the head)."""
    holder: dict = {}

    def hook(_m, args, output):
        holder["inputs"], holder["output"] = args[0], output

    handle = module.register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


def _forward(adapter: TargetAdapter, model_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, penultimate)`` of prepared inputs, differentiable, exactly as the adapter defines them."""
    info = adapter._find_head()
    with _head_capture(info.module) as cap:
        logits = adapter.forward(model_inputs)
    if "inputs" not in cap:
        raise RuntimeError("the classification head did not run during the forward pass")
    out = cap["output"] if isinstance(cap["output"], torch.Tensor) else None
    if info.logits_from_head and out is not None:
        logits = select_tokens(out, out, logits)
    return logits.float(), select_tokens(cap["inputs"], out, logits).float()


def _repeat(inputs, k: int):
    if isinstance(inputs, torch.Tensor):
        return inputs.repeat(k, *([1] * (inputs.dim() - 1)))
    return {n: _repeat(v, k) if isinstance(v, torch.Tensor) else v for n, v in inputs.items()}


def _embedding_space(adapter: TargetAdapter, items: list) -> SynthesisSpace:
    model = unwrap(adapter.model)
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module) or getattr(embeddings, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no input embedding layer (get_input_embeddings()); trigger synthesis for text "
            "models perturbs that layer's output"
        )
    inputs = _to_device(adapter.preprocess(items), adapter.device, adapter._dtype)
    n = len(items)
    attention = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    weight = embeddings.weight.detach().float()
    hidden = weight.shape[-1]

    def run(mask_rows: torch.Tensor, pattern_rows: torch.Tensor, k: int):
        batch = _repeat(inputs, k)
        keep = None if attention is None else _repeat(attention, k)[..., None].to(mask_rows.dtype)

        def hook(_m, _args, out):
            m = mask_rows if keep is None else mask_rows * keep  # padding stays untouched
            return ((1 - m) * out.float() + m * pattern_rows).to(out.dtype)

        handle = embeddings.register_forward_hook(hook)
        try:
            return _forward(adapter, batch)
        finally:
            handle.remove()

    low, high = weight.amin(0).view(1, 1, hidden), weight.amax(0).view(1, 1, hidden)
    return SynthesisSpace(run, n, (1, 1, hidden), (1, 1, hidden), low.cpu(), high.cpu(), "embeddings", adapter.device)


def _tensor_space(adapter: TargetAdapter, items: list) -> SynthesisSpace:
    prepared = _to_device(adapter.preprocess(items), adapter.device, adapter._dtype)
    key = None
    if isinstance(prepared, dict):
        key = "pixel_values" if "pixel_values" in prepared else None
        if key is None:
            raise ValueError(
                f"cannot synthesize triggers for inputs {sorted(prepared)}: no pixel_values and the model is not a "
                "text model; give the adapter a synthesis_space(items) method"
            )
        x = prepared[key]
    else:
        x = prepared
    if not x.is_floating_point():
        raise ValueError(
            f"cannot synthesize triggers in a space of {x.dtype} inputs (shape {tuple(x.shape)}): the model's inputs "
            "must be float tensors (pixels, features) or it must be a text model with input embeddings"
        )
    x = x.detach()
    n, shape = x.shape[0], tuple(x.shape[1:])
    if len(shape) >= 2:  # channels first: one mask for all channels, as Neural Cleanse does for images
        mask_shape, pattern_shape = (1, 1, *shape[1:]), (1, *shape)
        dims = [0, *range(2, x.dim())]
        low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        kind = "pixels" if len(shape) == 3 else "tensor"
    else:
        mask_shape = pattern_shape = (1, *shape)
        low, high = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
        kind = "tensor"
    span = (high - low).clamp_min(1e-3)
    high = low + span

    def run(mask_rows: torch.Tensor, pattern_rows: torch.Tensor, k: int):
        xk = _repeat(x, k).float()
        xp = ((1 - mask_rows) * xk + mask_rows * pattern_rows).to(x.dtype)
        batch = xp if key is None else {**_repeat(prepared, k), key: xp}
        return _forward(adapter, batch)

    return SynthesisSpace(
        run, n, mask_shape, pattern_shape, low.float().cpu(), high.float().cpu(), kind, adapter.device
    )


def synthesis_space(adapter: TargetAdapter, items: list) -> SynthesisSpace:
    """The [`SynthesisSpace`] for ``adapter`` on raw clean ``items`` (the adapter's own method when it has one)."""
    own = getattr(adapter, "synthesis_space", None)
    if callable(own):
        return own(items)
    if adapter.modality == "text":
        return _embedding_space(adapter, items)
    return _tensor_space(adapter, items)


def synthesize_triggers(
    space: SynthesisSpace,
    clean_pred: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 60,
    lr: float = 0.3,
    flip_threshold: float = 0.9,
    init_cost: float = 0.3,
    init_mask: float = 0.05,
    cost_multiplier: float = 1.5,
    patience: int = 3,
    class_batch: int = 16,
    seed: int = 0,
) -> SynthesisResult:
    """Reverse engineer one mask + pattern per class that flips the clean samples to that class.

    Loss per class ``t``: ``CE(f(x'), t) + λ_t * mean(m)``, averaged over the clean samples not already predicted as
    ``t``; ``λ_t`` follows Neural Cleanse's schedule (× ``cost_multiplier`` after ``patience`` steps at or above the
    flip threshold, ÷ it after ``patience`` steps below), so the mask shrinks as long as the trigger still works.

    Args:
        space: from [`synthesis_space`].
        clean_pred: ``(N,)`` the model's predictions on the unperturbed clean samples.
        num_classes: ``K``.
        steps: Adam steps (all classes at once, batched).
        lr: Adam learning rate on the mask and pattern logits.
        flip_threshold: the fraction of clean samples a mask must flip to count as effective.
        init_cost: initial ``λ``.
        init_mask: initial mask value everywhere (small: the optimisation grows the mask where it helps).
        cost_multiplier / patience: the adaptive ``λ`` schedule.
        class_batch: classes optimised together (``class_batch * N`` rows per forward pass).
        seed: seeds the initial masks and patterns.

    Returns:
        A [`SynthesisResult`] with per-class sizes, flip rates, masks, patterns and the perturbed outputs.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < flip_threshold <= 1.0:
        raise ValueError(f"flip_threshold must be in (0, 1], got {flip_threshold}")
    if not 0.0 < init_mask < 1.0:
        raise ValueError(f"init_mask must be in (0, 1), got {init_mask}")
    n = space.num_samples
    m0 = float(np.log(init_mask / (1 - init_mask)))
    gen = torch.Generator().manual_seed(seed)
    sizes, reached, flips, masks, patterns, logits_all, pen_all = [], [], [], [], [], [], []
    history: list[float] = []
    for start in range(0, num_classes, class_batch):
        classes = torch.arange(start, min(start + class_batch, num_classes))
        k = len(classes)
        m_logit = (torch.randn((k, *space.mask_shape[1:]), generator=gen) * 0.1 + m0).requires_grad_(True)
        p_logit = (torch.randn((k, *space.pattern_shape[1:]), generator=gen) * 0.1).requires_grad_(True)
        low, high = space.low.cpu(), space.high.cpu()
        target = classes.repeat_interleave(n)
        # Samples already of class t say nothing about how hard t is to force; they are left out of the flip rate.
        valid = (clean_pred.cpu()[None, :] != classes[:, None]).float()  # (k, N)
        weight = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
        opt = torch.optim.Adam([m_logit, p_logit], lr=lr, betas=(0.5, 0.9))
        cost = torch.full((k,), float(init_cost))
        up, down = torch.zeros(k), torch.zeros(k)
        best_size = torch.full((k,), float("inf"))
        best_flip = torch.zeros(k)
        best_m, best_p = torch.zeros_like(m_logit), torch.zeros_like(p_logit)
        last_size, last_flip = torch.ones(k), torch.zeros(k)
        for _ in range(steps):
            m = torch.sigmoid(m_logit)
            p = low + (high - low) * torch.sigmoid(p_logit)
            with torch.enable_grad():
                logits, _ = space.run(_rows(m, n, space.device), _rows(p, n, space.device), k)
            ce = nn.functional.cross_entropy(logits.cpu(), target, reduction="none").view(k, n)
            size = m.reshape(k, -1).mean(1)
            loss = ((ce * weight).sum(1) + cost * size).sum()
            # autograd.grad, not backward(): the model's own parameters must not accumulate .grad
            m_logit.grad, p_logit.grad = torch.autograd.grad(loss, [m_logit, p_logit])
            opt.step()
            with torch.no_grad():
                hit = (logits.detach().cpu().argmax(-1) == target).float().view(k, n)
                flip = (hit * valid).sum(1) / valid.sum(1).clamp_min(1.0)
                ok = flip >= flip_threshold
                better = ok & (size.detach() < best_size)
                best_size = torch.where(better, size.detach(), best_size)
                best_flip = torch.where(better, flip, best_flip)
                best_m[better], best_p[better] = m_logit.detach()[better], p_logit.detach()[better]
                last_size, last_flip = size.detach(), flip
                up, down = torch.where(ok, up + 1, torch.zeros(k)), torch.where(ok, torch.zeros(k), down + 1)
                cost = torch.where(up >= patience, cost * cost_multiplier, cost)
                cost = torch.where(down >= patience, cost / cost_multiplier, cost)
                up, down = torch.where(up >= patience, 0, up), torch.where(down >= patience, 0, down)
                history.append(float(loss))
        got = torch.isfinite(best_size)
        best_m[~got], best_p[~got] = m_logit.detach()[~got], p_logit.detach()[~got]
        fm = torch.sigmoid(best_m)
        fp = low + (high - low) * torch.sigmoid(best_p)
        with torch.no_grad():
            lg, pen = space.run(_rows(fm, n, space.device), _rows(fp, n, space.device), k)
        sizes.append(torch.where(got, best_size, last_size))
        reached.append(got)
        flips.append(torch.where(got, best_flip, last_flip))
        masks.append(fm)
        patterns.append(fp)
        logits_all.append(lg.detach().cpu().view(k, n, -1))
        pen_all.append(pen.detach().cpu().view(k, n, -1))
    return SynthesisResult(
        sizes=torch.cat(sizes).numpy().astype(np.float64),
        reached=torch.cat(reached).numpy(),
        flip_rates=torch.cat(flips).numpy().astype(np.float64),
        masks=torch.cat(masks),
        patterns=torch.cat(patterns),
        logits=torch.cat(logits_all),
        penultimate=torch.cat(pen_all),
        kind=space.kind,
        steps=steps,
        history=history,
    )


def _rows(x: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """``(K, *S)`` per-class tensors → ``(K * N, *S)`` rows, class-major (matching ``_repeat`` of the batch)."""
    return x.repeat_interleave(n, 0).to(device)


def anomaly_indices(sizes: np.ndarray) -> np.ndarray:
    """Neural Cleanse's anomaly index of each class: ``(median - size) / (1.4826 * MAD)``.

    Positive values are classes that are *easier* to force than the median class; Neural Cleanse flags a model when
    the largest one exceeds 2. A zero MAD (all sizes equal) is floored at ``1e-3 * median`` so a tie gives 0, not NaN.

    Args:
        sizes: ``(K,)`` smallest effective trigger sizes.

    Returns:
        ``(K,)`` float64.
    """
    s = np.asarray(sizes, dtype=np.float64)
    med = float(np.median(s))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(s - med)))
    return (med - s) / max(mad, 1e-3 * abs(med), 1e-12)


@functools.lru_cache(maxsize=256)
def chance_anomaly_index(k: int, draws: int = 4000) -> float:
    """The typical largest anomaly index of ``k`` classes whose trigger sizes are i.i.d. normal: what a model
    without an outlier class reaches by chance.

    It grows with ``k`` (0.67 for 2 classes, 1.6 for 10, 2.3 for 62) because it is a maximum over classes. The
    median over simulated models, not the mean: with 3 classes the MAD of the sizes can be near 0, and the mean
    does not settle. Computed with a fixed seed, so it is the same number on every call.

    Args:
        k: the number of classes (at least 2).
        draws: simulated models.
    """
    if k < 2:
        raise ValueError(f"the anomaly index needs at least 2 classes, got {k}")
    x = np.random.default_rng(0).standard_normal((draws, k))
    med = np.median(x, axis=1, keepdims=True)
    mad = MAD_CONSISTENCY * np.median(np.abs(x - med), axis=1, keepdims=True)
    return float(np.median(((med - x) / mad).max(axis=1)))
