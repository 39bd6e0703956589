"""Data-free maximum-margin statistics per class (MM-BD): how far can an input push each class's logit ahead?

MM-BD (Wang, Mahmood, Miller and Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary
Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024, https://arxiv.org/abs/2205.06900): for every
class ``c``, maximise the logit margin ``f_c(x) - max_{j != c} f_j(x)`` over inputs ``x`` in the model's valid input
domain. A backdoor teaches the model a shortcut that overrides everything else in the input, so the target class
admits an abnormally large achievable margin, whatever the trigger's shape (patch, blend, sinusoid, colour filter,
warp): the statistic needs no trigger model and no clean samples beyond the domain's bounds.

The input domain is the scan's synthesis space ([`synthesis_space`]) with the mask at 1 everywhere, so the pattern is
the input: the preprocessed pixels of image models (bounded by the clean batch's per-channel range), float tensors of
plain torch models, and for text models the output of the embedding layer, with one vector (inside the embedding
matrix's per-dimension range) at every non-padding token position of the clean samples.

The margin is maximised by projected gradient ascent (Adam on the input, then clipping to the domain) from a few
random starts per class, all classes and starts in one batch. The paper fits a null density to the other classes'
maximum margins and takes the order-statistic p-value of the largest; here the outlier measure is the robust z-score
``(margin - median) / (1.4826 * MAD)`` over classes (Neural Cleanse's anomaly index with the sign turned, see
[`anomaly_indices`]), which needs no density family and matches the scan's other per-class statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..targets.base import TargetAdapter
from .progress import tqdm_disable
from .synthesis import MAX_SYNTHESIS_SIDE, anomaly_indices, synthesis_space

logger = logging.getLogger(__name__)

__all__ = ["MaxMarginResult", "logit_margins", "max_margins"]


@dataclass
class MaxMarginResult:
    """Per-class outcome of [`max_margins`] (``K`` classes).

    Attributes:
        margins: ``(K,)`` the largest margin ``f_c(x) - max_{j != c} f_j(x)`` reached for class ``c`` over the starts.
        anomaly: ``(K,)`` robust z-score of each margin over the classes, ``(margin - median) / (1.4826 * MAD)``;
            large = a class that can be forced abnormally far ahead.
        inputs: ``(K, *S)`` the input (in the space's units) that reached each class's margin.
        kind: the space the inputs live in (``"pixels"``, ``"embeddings"``, ``"tensor"``).
        steps / starts: the budget that produced them.
    """

    margins: np.ndarray
    anomaly: np.ndarray
    inputs: torch.Tensor
    kind: str
    steps: int
    starts: int


def logit_margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logits[r, c_r] - max_{j != c_r} logits[r, j]`` per row ``r`` (``logits (R, C)``, ``classes (R,)``)."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    others = logits.scatter(1, classes[:, None], float("-inf")).amax(1)
    return own - others


def max_margins(
    adapter: TargetAdapter,
    items: list,
    num_classes: int,
    *,
    steps: int = 30,
    starts: int = 4,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool | None = None,
) -> MaxMarginResult:
    """The largest logit margin each class admits over the model's input domain, and its outlier score.

    Every class gets ``starts`` inputs drawn uniformly inside the domain's bounds; Adam (learning rate ``lr`` times
    the bounds' span, so the step means the same in any units) ascends the margin of each, and each step clips the
    input back into the bounds (the projection). The margin of a class is the best over its starts and steps.

    Args:
        adapter: the target (any family; the space is [`synthesis_space`]'s).
        items: clean items: their value range bounds the domain (images, tensors) and the first ``starts`` of them
            give text models their token positions (sequence lengths, padding).
        num_classes: ``K``.
        steps: gradient-ascent steps (``K * starts`` rows per forward pass).
        starts: random starts per class.
        lr: Adam's learning rate, as a fraction of the bounds' span.
        seed: seeds the starts.
        progress: a tqdm bar over the steps (``None``: only when stderr is a terminal).

    Returns:
        A [`MaxMarginResult`]: per-class margins ``(K,)``, their robust z-scores and the maximising inputs.

    Example:
        ```python
        >>> adapter = load_target(model)
        >>> result = max_margins(adapter, clean_images[:20], adapter.num_classes, steps=30)
        >>> int(result.margins.argmax()), float(result.anomaly.max()) > 3.0
        (0, True)
        ```
    """
    if steps < 1 or starts < 1:
        raise ValueError(f"max_margins needs steps >= 1 and starts >= 1, got steps={steps}, starts={starts}")
    if len(items) < 1:
        raise ValueError("max_margins needs at least one clean item (it bounds the input domain)")
    # the bounds come from every clean item; the rows of the batch from the first `starts` (one per start)
    bounds = synthesis_space(adapter, items)
    rows = list(items[:starts])
    while len(rows) < starts:  # fewer items than starts: reuse them (only text reads their token positions)
        rows += list(items[: starts - len(rows)])
    space = synthesis_space(adapter, rows)
    if space.downsized is not None:  # large images: the margins are maximised at the synthesis's own size
        space = space.downsized(MAX_SYNTHESIS_SIDE) or space
    low, high = bounds.low.float(), bounds.high.float()
    span = (high - low).clamp_min(1e-6)
    shape = (num_classes * starts, *space.pattern_shape[1:])
    gen = torch.Generator().manual_seed(seed)
    # the input in units of the bounds, u in [0, 1]: Adam's step (about lr per entry) is then a fraction of the span
    u = torch.rand(shape, generator=gen).requires_grad_(True)
    ones = torch.ones((num_classes * starts, *space.mask_shape[1:]), device=space.device)
    # row r of a batch of K * starts rows is start r % starts of class r // starts (space.run's class-major layout)
    classes = torch.arange(num_classes).repeat_interleave(starts)
    opt = torch.optim.Adam([u], lr=lr, betas=(0.5, 0.9))
    best = torch.full((len(classes),), float("-inf"))
    best_u = u.detach().clone()

    def margins_of(values: torch.Tensor) -> torch.Tensor:
        logits, _ = space.run(ones, (low + span * values).to(space.device), num_classes)
        return logit_margins(logits.float().cpu(), classes)

    def keep_best(margin: torch.Tensor) -> None:
        nonlocal best
        better = margin > best
        best = torch.where(better, margin, best)
        best_u[better] = u.detach()[better]

    bar = tqdm(total=steps, desc="max-margin", unit="step", disable=tqdm_disable(progress))
    with bar:
        for _ in range(steps):
            with torch.enable_grad():
                margin = margins_of(u)
                # autograd.grad, not backward(): the model's own parameters must not accumulate .grad
                (u.grad,) = torch.autograd.grad(-margin.sum(), [u])
            with torch.no_grad():
                keep_best(margin.detach())
                opt.step()
                u.clamp_(0.0, 1.0)  # the projection back into the domain
            bar.update()
        with torch.no_grad():  # the last step's input is not evaluated inside the loop
            keep_best(margins_of(u))
    per_class = best.view(num_classes, starts)
    margins = per_class.amax(1).numpy().astype(np.float64)
    pick = per_class.argmax(1) + torch.arange(num_classes) * starts
    return MaxMarginResult(
        margins=margins,
        anomaly=anomaly_indices(-margins),  # the largest margin is the outlier: the index of the negated margins
        inputs=low + span * best_u[pick],
        kind=space.kind,
        steps=steps,
        starts=starts,
    )
