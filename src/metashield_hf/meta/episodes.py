"""Episodes: one zoo model = one task; a support set of k clean inputs and a query of clean and triggered inputs.

ψ is computed relative to the support only (what deployment has). The query never contains a support input, nor the
triggered copy of one (probe input ``i`` and triggered probe input ``i`` are the same image or sentence). For a clean
model the "triggered" probe inputs are labelled 0: the trigger pattern is present but there is no backdoor to fire, so
a detector that flags the pattern itself (a training artifact) is penalised.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..features import build_reference, compute_features, loo_features
from .cache import TaskActivations
from .inner import make_pseudo_features

K_CHOICES = (5, 10, 20, 50)
INNER_MODES = ("deployable", "oracle")
MIN_SUPPORT = 3  # the detector's reference needs >= 2 rows after leave-one-out
MIN_QUERY = 4


@dataclass
class Episode:
    """One few-shot task drawn from one zoo model (ψ of ``F`` features per input).

    Attributes:
        support: ``(k, F)`` leave-one-out ψ of the clean support; also the detector's reference set.
        inner_anomalies: ``(m, F)`` the inner loop's positives: pseudo-anomalies made from the support
            (``deployable``) or true triggered inputs (``oracle``, ablation only).
        query: ``(q, F)`` ψ of the query, clean rows first.
        query_labels: ``(q,)`` 1 = triggered input to a backdoored model, else 0.
        model_id: the task's zoo model.
        support_index, query_clean_index, query_triggered_index, oracle_index: probe rows used (for audits and tests;
            ``oracle_index`` is empty in ``deployable`` mode).
    """

    support: torch.Tensor
    inner_anomalies: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    model_id: str
    support_index: torch.Tensor
    query_clean_index: torch.Tensor
    query_triggered_index: torch.Tensor
    oracle_index: torch.Tensor


def draw_rows(
    n_clean: int, n_triggered: int, k: int, seed: int, n_query: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe rows of one episode: ``(support, clean query, shuffled triggered pool)``, deterministic under ``seed``.

    ``k`` is capped so that at least ``MIN_QUERY`` clean rows remain for the query. The pool holds the triggered rows
    whose clean twin is not in the support (the query must be new to the detector); an episode takes its triggered
    query (and, in ``oracle`` mode, its inner-loop positives first) from its front.
    """
    k = max(MIN_SUPPORT, min(k, n_clean - MIN_QUERY))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_clean, generator=g)
    support_idx, rest = perm[:k], perm[k:]
    pool = rest[rest < n_triggered]
    return support_idx, rest[:n_query], pool[torch.randperm(len(pool), generator=g)]


def make_episode(
    task: TaskActivations,
    k: int,
    *,
    seed: int,
    groups: Sequence[str] | None = None,
    n_query: int = 32,
    inner_mode: str = "deployable",
) -> Episode:
    """Sample one episode from a task (deterministic under ``seed``).

    Args:
        task: cached activations of one zoo model.
        k: support size, capped so that at least ``MIN_QUERY`` clean inputs remain for the query.
        seed: seeds the draw, the pseudo-anomalies and ψ's perturbations.
        groups: ψ feature groups (default: all).
        n_query: clean and triggered query inputs each (at most what the probe has left).
        inner_mode: ``"deployable"`` (pseudo-anomalies from the support; the default and what deployment can do) or
            ``"oracle"`` (the model's true trigger; ablation only — deployment never has it).

    Returns:
        An [`Episode`].

    Example:
        ```python
        >>> ep = make_episode(load_task(path), k=10, seed=0)
        >>> ep.support.shape[0], ep.query.shape[0] == ep.query_labels.shape[0]
        (10, True)
        ```
    """
    if inner_mode not in INNER_MODES:
        raise ValueError(f"inner_mode must be one of {INNER_MODES}, got {inner_mode!r}")
    n = len(task.clean)
    if n < MIN_SUPPORT + MIN_QUERY:
        raise ValueError(f"{task.model_id}: {n} clean probe inputs; episodes need at least {MIN_SUPPORT + MIN_QUERY}")
    c, t = task.clean, task.triggered
    support_idx, clean_q, pool = draw_rows(n, len(t), k, seed, n_query)
    k = len(support_idx)
    ref = build_reference(c.penultimate[support_idx], c.logits[support_idx], task.head_weight, task.head_bias)
    support = loo_features(ref, groups, seed=seed)
    m = max(k, 8)
    oracle_idx = torch.zeros(0, dtype=torch.long)
    if inner_mode == "oracle" and task.backdoored:
        n_oracle = min(m, len(pool) // 2)
        oracle_idx, pool = pool[:n_oracle], pool[n_oracle:]
        anomalies = compute_features(t.penultimate[oracle_idx], t.logits[oracle_idx], ref, groups, seed=seed)
    else:  # deployable (and oracle on a clean model, which has no trigger to show): only the support is used
        anomalies = make_pseudo_features(ref, m, groups, seed)
    trig_q = pool[:n_query]

    pen = torch.cat([c.penultimate[clean_q], t.penultimate[trig_q]])
    logits = torch.cat([c.logits[clean_q], t.logits[trig_q]])
    query = compute_features(pen, logits, ref, groups, seed=seed)
    labels = torch.cat([torch.zeros(len(clean_q)), torch.full((len(trig_q),), float(task.backdoored))])
    return Episode(support, anomalies, query, labels, task.model_id, support_idx, clean_q, trig_q, oracle_idx)


def sample_episode(
    tasks: Sequence[TaskActivations],
    rng: random.Random,
    *,
    k_choices: Sequence[int] = K_CHOICES,
    groups: Sequence[str] | None = None,
    n_query: int = 32,
    inner_mode: str = "deployable",
) -> Episode:
    """Draw a task, a support size from ``k_choices`` and a seed from ``rng``, and make that episode."""
    task = rng.choice(tasks)
    k = rng.choice(list(k_choices))
    return make_episode(task, k, seed=rng.randrange(2**31), groups=groups, n_query=n_query, inner_mode=inner_mode)
