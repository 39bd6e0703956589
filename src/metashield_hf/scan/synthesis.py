"""Trigger synthesis without triggered examples: per-class mask + pattern reverse engineering.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..targets.base import TargetAdapter, to_device
from ..targets.heads import select_tokens
from ..targets.transformers_models import unwrap
from .config import MAX_SYNTHESIS_SIDE
from .progress import tqdm_disable

logger = logging.getLogger(__name__)

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the standard deviation for normal data
#: The downsized clean samples must keep at least this fraction of the model's predictions at its own size (else the
#: model, e.g. one with fixed position embeddings or tuned to its size, is synthesized at its own size).
MIN_DOWNSIZED_AGREEMENT = 0.8


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
        inputs: the clean batch in the space (``(N, *pattern_shape[1:])``) where the space is the model's own input
            (pixels, tensors); ``None`` for embeddings.
    """

    run: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
    num_samples: int
    mask_shape: tuple[int, ...]
    pattern_shape: tuple[int, ...]
    low: torch.Tensor
    high: torch.Tensor
    kind: str
    device: torch.device = torch.device("cpu")
    inputs: torch.Tensor | None = None
    downsized: Callable[[int], SynthesisSpace | None] | None = field(default=None, repr=False)


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
        inputs: the clean batch in the space where it is the model's own input (pixels, tensors), ``(N, *S)``, so that
            pictures of the patched samples ([`render_report`]) need neither the model nor its preprocessing again;
            ``None`` for embeddings.
        synthesized_at: ``(H, W)`` of the downsized samples the triggers were optimised on (see
            `MAX_SYNTHESIS_SIDE`); ``None`` at the model's own size.
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
    snapshots: dict[int, SynthesisResult] = field(default_factory=dict)
    inputs: torch.Tensor | None = field(default=None, repr=False)
    synthesized_at: tuple[int, int] | None = None


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
    inputs = to_device(adapter.preprocess(items), adapter.device, adapter.dtype)
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
    prepared = to_device(adapter.preprocess(items), adapter.device, adapter.dtype)
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
    return _pixel_space(adapter, prepared, key, x.detach())


def _pixel_space(adapter: TargetAdapter, prepared, key: str | None, x: torch.Tensor) -> SynthesisSpace:
    """The space of the model's own float inputs ``x`` (``prepared[key]`` when the inputs are a dict)."""
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

    space = SynthesisSpace(
        run, n, mask_shape, pattern_shape, low.float().cpu(), high.float().cpu(), kind, adapter.device, x
    )
    if kind == "pixels":
        space.downsized = functools.partial(_downsized_space, adapter, prepared, key, x)
    return space


def _downsized_space(
    adapter: TargetAdapter, prepared, key: str | None, x: torch.Tensor, side: int
) -> SynthesisSpace | None:
    """The space of ``x`` downsized (bilinear, antialiased) so that its longer side is ``side``; ``None`` where it is
    not larger, or where the model fails on the smaller size or changes more than ``1 - MIN_DOWNSIZED_AGREEMENT`` of
    its predictions there (one forward pass at each size)."""
    h, w = x.shape[-2:]
    if max(h, w) <= side:
        return None
    size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
    small = nn.functional.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    small = small.to(x.dtype)
    try:
        with torch.no_grad():
            own, _ = _forward(adapter, x if key is None else prepared)
            down, _ = _forward(adapter, small if key is None else {**prepared, key: small})
    except Exception as e:  # noqa: BLE001 - any failure at the smaller size (fixed position embeddings, ...) keeps it
        logger.info("the model does not run at %sx%s (%s); synthesizing at %sx%s", *size, type(e).__name__, h, w)
        return None
    agree = float((own.argmax(-1) == down.argmax(-1)).float().mean())
    if agree < MIN_DOWNSIZED_AGREEMENT:
        logger.info(
            "at %sx%s the model keeps only %.0f%% of its predictions on the clean samples; synthesizing at %sx%s",
            *size,
            100 * agree,
            h,
            w,
        )
        return None
    return _pixel_space(adapter, prepared, key, small)


def synthesis_space(adapter: TargetAdapter, items: list) -> SynthesisSpace:
    """The [`SynthesisSpace`] for ``adapter`` on raw clean ``items`` (the adapter's own method when it has one)."""
    own = getattr(adapter, "synthesis_space", None)
    if callable(own):
        return own(items)
    if adapter.modality == "text":
        return _embedding_space(adapter, items)
    return _tensor_space(adapter, items)


def _init_state(
    classes: torch.Tensor,
    space: SynthesisSpace,
    gen: torch.Generator,
    init_mask: float,
    init_cost: float,
    uniform_mask: bool = False,
):
    """Optimisation state of ``len(classes)`` classes, one row each: mask/pattern logits, their Adam moments, the
    adaptive cost schedule and the best effective trigger so far. A uniform mask is one value per class."""
    k = len(classes)
    m0 = float(np.log(init_mask / (1 - init_mask)))
    mask_shape = tuple(1 for _ in space.mask_shape[1:]) if uniform_mask else space.mask_shape[1:]
    m_logit = torch.randn((k, *mask_shape), generator=gen) * 0.1 + m0
    p_logit = torch.randn((k, *space.pattern_shape[1:]), generator=gen) * 0.1
    return {
        "classes": classes,
        "m_logit": m_logit,
        "p_logit": p_logit,
        "m_avg": torch.zeros_like(m_logit),
        "m_sq": torch.zeros_like(m_logit),
        "p_avg": torch.zeros_like(p_logit),
        "p_sq": torch.zeros_like(p_logit),
        "cost": torch.full((k,), float(init_cost)),
        "up": torch.zeros(k),
        "down": torch.zeros(k),
        "best_size": torch.full((k,), float("inf")),
        "best_flip": torch.zeros(k),
        "best_m": m_logit.clone(),
        "best_p": p_logit.clone(),
        "last_size": torch.ones(k),
        "last_flip": torch.zeros(k),
    }


def _rows_of(state: dict, index) -> dict:
    return {name: value[index] for name, value in state.items()}


def _cat(states: list[dict]) -> dict:
    return {name: torch.cat([s[name] for s in states]) for name in states[0]}


def _optimise(
    space: SynthesisSpace,
    state: dict,
    clean_pred: torch.Tensor,
    *,
    steps: int,
    done: int,
    lr: float,
    flip_threshold: float,
    cost_multiplier: float,
    patience: int,
    history: list[float],
    loss_quantile: float = 1.0,
    on_step: Callable[[], object] | None = None,
) -> dict:
    """``steps`` more Adam steps (after ``done`` already taken) on one batch of classes; returns the new state.

    Adam is written out (torch.optim.Adam's update, betas (0.5, 0.9)) so the state is a plain per-class row that
    can be split and regrouped: a class's trajectory does not depend on which other classes share its batch.
    """
    s = {name: value.clone() for name, value in state.items()}
    n, k = space.num_samples, len(s["classes"])
    target = s["classes"].repeat_interleave(n)
    # Samples already of class t say nothing about how hard t is to force; they are left out of the flip rate.
    valid = (clean_pred.cpu()[None, :] != s["classes"][:, None]).float()  # (k, N)
    weight = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
    beta1, beta2, eps = 0.5, 0.9, 1e-8
    for step in range(done + 1, done + steps + 1):
        m_logit = s["m_logit"].requires_grad_(True)
        p_logit = s["p_logit"].requires_grad_(True)
        m = torch.sigmoid(m_logit)
        p = _pattern(space, p_logit)
        with torch.enable_grad():
            logits, _ = space.run(_rows(m, n, space.device), _rows(p, n, space.device), k)
        ce = nn.functional.cross_entropy(logits.cpu(), target, reduction="none").view(k, n)
        size = m.reshape(k, -1).mean(1)
        if loss_quantile < 1.0:
            weight = _easiest(ce.detach(), valid, loss_quantile)
        loss = ((ce * weight).sum(1) + s["cost"] * size).sum()
        # autograd.grad, not backward(): the model's own parameters must not accumulate .grad
        g_m, g_p = torch.autograd.grad(loss, [m_logit, p_logit])
        with torch.no_grad():
            for name, grad in (("m", g_m), ("p", g_p)):
                avg, sq = s[f"{name}_avg"], s[f"{name}_sq"]
                avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                s[f"{name}_logit"] = s[f"{name}_logit"].detach().addcdiv(avg, denom, value=-lr / (1 - beta1**step))
            hit = (logits.detach().cpu().argmax(-1) == target).float().view(k, n)
            flip = (hit * valid).sum(1) / valid.sum(1).clamp_min(1.0)
            ok = flip >= flip_threshold
            size = size.detach()
            better = ok & (size < s["best_size"])
            s["best_size"] = torch.where(better, size, s["best_size"])
            s["best_flip"] = torch.where(better, flip, s["best_flip"])
            s["best_m"][better], s["best_p"][better] = m_logit.detach()[better], p_logit.detach()[better]
            s["last_size"], s["last_flip"] = size, flip
            up = torch.where(ok, s["up"] + 1, torch.zeros(k))
            down = torch.where(ok, torch.zeros(k), s["down"] + 1)
            cost = torch.where(up >= patience, s["cost"] * cost_multiplier, s["cost"])
            s["cost"] = torch.where(down >= patience, cost / cost_multiplier, cost)
            s["up"], s["down"] = torch.where(up >= patience, 0, up), torch.where(down >= patience, 0, down)
            history.append(float(loss))
        if on_step is not None:
            on_step()
    s["m_logit"], s["p_logit"] = s["m_logit"].detach(), s["p_logit"].detach()
    return s


def _easiest(ce: torch.Tensor, valid: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per class (row), equal weights on the ``ceil(quantile * valid)`` valid samples of lowest loss, 0 elsewhere."""
    count = (valid.sum(1, keepdim=True) * quantile).ceil().clamp_min(1.0)
    rank = torch.where(valid.bool(), ce, torch.inf).argsort(1).argsort(1)  # 0 = the easiest valid sample
    keep = (rank < count).float() * valid
    return keep / keep.sum(1, keepdim=True).clamp_min(1.0)


def refine_candidates(
    sizes: torch.Tensor, reached: torch.Tensor, flip_rates: torch.Tensor, refine: int
) -> torch.Tensor:
    """The ``refine`` classes most likely to hold the smallest trigger after the screen: the smallest effective sizes
    first, then the classes not yet effective by flip rate."""
    rank = torch.where(reached, sizes, 1.0 + (1.0 - flip_rates))  # sizes are fractions, < 1
    return rank.argsort()[:refine].sort().values


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
    refine: int | None = None,
    screen_steps: int | None = None,
    snapshots: Sequence[int] = (),
    seed: int = 0,
    uniform_mask: bool = False,
    loss_quantile: float = 1.0,
    progress: bool | None = None,
    stage: str = "synthesis",
    max_side: int | None = None,
) -> SynthesisResult:
    """Reverse engineer one mask + pattern per class that flips the clean samples to that class.

    Loss per class ``t``: ``CE(f(x'), t) + λ_t * mean(m)``, averaged over the clean samples not already predicted as
    ``t``; ``λ_t`` follows Neural Cleanse's schedule (× ``cost_multiplier`` after ``patience`` steps at or above the
    flip threshold, ÷ it after ``patience`` steps below), so the mask shrinks as long as the trigger still works.

    With ``refine`` (screen and refine, as K-Arm does for Neural Cleanse: Shen et al., ICML 2021), every class is
    optimised for ``screen_steps`` only, and just the ``refine`` most promising classes ([`refine_candidates`])
    continue to ``steps``. A refined class follows exactly the trajectory it would have in a full run; the others
    keep their screen result (for an effective trigger an upper bound of its full-run size, since the recorded size only
    ever shrinks; a class not yet effective keeps its last size, as in a full run).

    Args:
        space: from [`synthesis_space`].
        clean_pred: ``(N,)`` the model's predictions on the unperturbed clean samples.
        num_classes: ``K``.
        steps: Adam steps of a fully optimised class (classes are batched).
        lr: Adam learning rate on the mask and pattern logits.
        flip_threshold: the fraction of clean samples a mask must flip to count as effective.
        init_cost: initial ``λ``.
        init_mask: initial mask value everywhere (small: the optimisation grows the mask where it helps).
        cost_multiplier / patience: the adaptive ``λ`` schedule.
        class_batch: classes optimised together (``class_batch * N`` rows per forward pass).
        refine: classes optimised for the full ``steps`` after the screen (``None``, or ``>= K``: all of them).
        screen_steps: steps of the screen (required with ``refine``; ``>= steps``: no screen).
        snapshots: budgets below ``steps`` at which the result is also kept, in ``result.snapshots[b]``: what
            ``steps=b`` would have returned (the same trajectory, cut short). For choosing a budget; not with ``refine``.
        seed: seeds the initial masks and patterns.
        uniform_mask: one mask value ``a`` for the whole input, so the trigger is a blend ``(1 - a) * x + a * p``
            of the sample with a full-size pattern and its size is ``a``: the form of blended and other whole-input
            triggers (Chen et al. 2017; SIG, Barni et al. 2019), which a small free-form mask cannot express.
        loss_quantile: the cross-entropy of each class is averaged over only this fraction of its clean samples,
            those it is lowest on at each step (1: all of them). With a flip threshold below 1, this lets the mask
            settle on the samples it can flip cheaply, as a source-specific trigger (TaCT, Tang et al. 2021) flips
            only some classes' inputs, instead of growing to flip the rest too.
        progress: a tqdm bar on stderr over the Adam steps, named ``"{stage} class(es) i[-j]/K"`` after the classes
            of the batch it optimises (``None``: only when stderr is a terminal).
        stage: what the bar calls this synthesis (``"blend synthesis"``, ...).
        max_side: images whose longer side passes this are optimised on the clean samples downsized to it, and the
            triggers upsampled to the model's size at the end (``None``: `MAX_SYNTHESIS_SIDE`; ``0``: never).

    Returns:
        A [`SynthesisResult`] with per-class sizes, flip rates, masks, patterns and the perturbed outputs.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < flip_threshold <= 1.0:
        raise ValueError(f"flip_threshold must be in (0, 1], got {flip_threshold}")
    if not 0.0 < init_mask < 1.0:
        raise ValueError(f"init_mask must be in (0, 1), got {init_mask}")
    if not 0.0 < loss_quantile <= 1.0:
        raise ValueError(f"loss_quantile must be in (0, 1], got {loss_quantile}")
    if refine is not None and refine < 1:
        raise ValueError(f"refine must be >= 1 (or None for no screen), got {refine}")
    if refine is not None and (screen_steps is None or screen_steps < 1):
        raise ValueError(f"refine needs screen_steps >= 1, got {screen_steps}")
    marks = sorted({int(b) for b in snapshots})
    if marks and (marks[0] < 1 or marks[-1] >= steps or refine is not None):
        raise ValueError(f"snapshots must lie in [1, steps) and need refine=None, got {list(snapshots)}")
    native = space
    side = MAX_SYNTHESIS_SIDE if max_side is None else max_side
    if side and space.downsized is not None:
        space = space.downsized(side) or space
        if space is not native:
            logger.info(
                "synthesizing on the clean samples downsized from %s to %s (MAX_SYNTHESIS_SIDE %d)",
                "x".join(map(str, native.mask_shape[-2:])),
                "x".join(map(str, space.mask_shape[-2:])),
                side,
            )
    # a screen as long as the whole budget, or one that keeps every class, is no screen
    staged = refine is not None and refine < num_classes and screen_steps < steps
    first = screen_steps if staged else steps
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    settings = dict(
        lr=lr,
        flip_threshold=flip_threshold,
        cost_multiplier=cost_multiplier,
        patience=patience,
        history=history,
        loss_quantile=loss_quantile,
    )

    batches = -(-num_classes // class_batch)
    total = batches * first + (-(-min(refine, num_classes) // class_batch) * (steps - first) if staged else 0)
    bar = tqdm(total=total, desc=stage, unit="step", disable=tqdm_disable(progress))

    def run(state: dict, count: int, done: int, phase: str = "") -> dict:
        parts = []
        for start in range(0, len(state["classes"]), class_batch):
            part = _rows_of(state, slice(start, start + class_batch))
            bar.set_description(f"{stage}{phase} {_class_range(part['classes'], num_classes)}")
            parts.append(_optimise(space, part, clean_pred, steps=count, done=done, on_step=bar.update, **settings))
        return _cat(parts)

    # initial masks and patterns drawn per class batch (mask, then pattern), so a seed starts where it always did
    states = [
        _init_state(torch.arange(a, min(a + class_batch, num_classes)), space, gen, init_mask, init_cost, uniform_mask)
        for a in range(0, num_classes, class_batch)
    ]
    state, done, kept = _cat(states), 0, {}
    with bar:
        for mark in [*marks, first]:
            state, done = run(state, mark - done, done, " screen" if staged else ""), mark
            if mark < first:
                kept[mark] = _finish(space, state, class_batch, mark, native)
        if staged:
            got, sizes, flips = _recorded(state)
            chosen = refine_candidates(sizes, got, flips, refine)
            refined = run(_rows_of(state, chosen), steps - first, first, " refine")
            for name, value in refined.items():
                state[name][chosen] = value
    result = _finish(space, state, class_batch, steps, native)
    result.history, result.snapshots = history, kept
    return result


def _class_range(classes: torch.Tensor, num_classes: int) -> str:
    """How a progress bar names a batch of classes, 1-based: ``class 3/10``, ``classes 1-10/10``, ``classes 2,7/10``."""
    ids = [int(c) + 1 for c in classes]
    if len(ids) == 1:
        return f"class {ids[0]}/{num_classes}"
    consecutive = ids == list(range(ids[0], ids[-1] + 1))
    return f"classes {f'{ids[0]}-{ids[-1]}' if consecutive else ','.join(map(str, ids))}/{num_classes}"


def _finish(
    space: SynthesisSpace, state: dict, class_batch: int, steps: int, native: SynthesisSpace | None = None
) -> SynthesisResult:
    """The recorded trigger of every class in ``state`` and the target's outputs on the clean samples it perturbs; a
    trigger optimised on downsized samples is upsampled to the ``native`` space first, and the outputs are its."""
    got, sizes, flips = _recorded(state)
    # a class that never reached the flip threshold keeps its last mask and pattern
    keep = got.view(-1, *([1] * (state["m_logit"].dim() - 1)))
    best_m = torch.where(keep, state["best_m"], state["m_logit"])
    best_p = torch.where(keep, state["best_p"], state["p_logit"])
    masks, patterns = torch.sigmoid(best_m), _pattern(space, best_p)
    synthesized_at = None
    if native is not None and native is not space:
        synthesized_at = tuple(int(v) for v in space.mask_shape[-2:])
        masks, patterns = _upsample(masks, native.mask_shape), _upsample(patterns, native.pattern_shape)
        patterns = torch.maximum(torch.minimum(patterns, native.high), native.low)
        space = native
    n, logits_all, pen_all = space.num_samples, [], []
    with torch.no_grad():
        for a in range(0, len(masks), class_batch):
            fm, fp = masks[a : a + class_batch], patterns[a : a + class_batch]
            lg, pen = space.run(_rows(fm, n, space.device), _rows(fp, n, space.device), len(fm))
            logits_all.append(lg.detach().cpu().view(len(fm), n, -1))
            pen_all.append(pen.detach().cpu().view(len(fm), n, -1))
    return SynthesisResult(
        sizes=sizes.numpy().astype(np.float64),
        reached=got.numpy(),
        flip_rates=flips.numpy().astype(np.float64),
        masks=masks,
        patterns=patterns,
        logits=torch.cat(logits_all),
        penultimate=torch.cat(pen_all),
        kind=space.kind,
        steps=steps,
        inputs=space.inputs,
        synthesized_at=synthesized_at,
    )


def _upsample(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-class ``(K, C, h, w)`` masks or patterns at the spatial size of ``shape`` (bilinear, so a mask's mean, its
    size, stays about the same); a uniform ``(K, 1, 1, 1)`` mask stays as it is."""
    if x.shape[-2:] == (1, 1) or tuple(x.shape[-2:]) == tuple(shape[-2:]):
        return x
    return nn.functional.interpolate(x.float(), size=tuple(shape[-2:]), mode="bilinear", align_corners=False)


def _pattern(space: SynthesisSpace, p_logit: torch.Tensor) -> torch.Tensor:
    """Pattern logits → patterns inside the space's value range."""
    low, high = space.low.cpu(), space.high.cpu()
    return low + (high - low) * torch.sigmoid(p_logit)


def _recorded(state: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(reached, size, flip rate)`` per class: the smallest effective trigger, or the last one where none was."""
    got = torch.isfinite(state["best_size"])
    return (
        got,
        torch.where(got, state["best_size"], state["last_size"]),
        torch.where(got, state["best_flip"], state["last_flip"]),
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
