"""Episodes: one zoo model = one task; a support set of k clean inputs and a query of clean and triggered inputs.

ψ is computed relative to the support only (what deployment has). For a clean model the "triggered" probe inputs are
labelled 0: the trigger pattern is present but there is no backdoor to fire, so a detector that flags the pattern
itself (a training artifact) is penalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..features import build_reference, compute_features, loo_features
from .cache import TaskActivations
from .inner import make_pseudo_features

K_CHOICES = (5, 10, 20, 50)


@dataclass
class Episode:
    support: torch.Tensor  # (k, F) ψ of the clean support, leave-one-out; also the detector's reference set
    inner_anomalies: torch.Tensor  # (m, F) pseudo-anomalies (deployable) or true triggered inputs (oracle)
    query: torch.Tensor  # (q, F)
    query_labels: torch.Tensor  # (q,) 1 = triggered input to a backdoored model
    model_id: str


def make_episode(
    task: TaskActivations,
    k: int,
    *,
    seed: int,
    groups=None,
    n_query: int = 32,
    inner_mode: str = "deployable",
) -> Episode:
    """Sample one episode from a task (deterministic under ``seed``).

    Args:
        task: cached activations of one zoo model.
        k: support size (clipped so that a query remains).
        n_query: clean and triggered query inputs each (at most what the probe has).
        inner_mode: ``"deployable"`` (pseudo-anomalies from the support) or ``"oracle"`` (the true trigger; ablation
            only — deployment never has it).
    """
    g = torch.Generator().manual_seed(seed)
    n = len(task.clean)
    k = max(3, min(k, n - 4))
    perm = torch.randperm(n, generator=g)
    support_idx, rest = perm[:k], perm[k:]
    clean_q = rest[:n_query]
    head_w, head_b = task.head_weight, task.head_bias
    ref = build_reference(task.clean.penultimate[support_idx], task.clean.logits[support_idx], head_w, head_b)
    support = loo_features(ref, groups, seed=seed)

    trig_perm = torch.randperm(len(task.triggered), generator=g)
    trig_q = trig_perm[:n_query]
    if inner_mode == "deployable":
        anomalies = make_pseudo_features(ref, max(k, 8), groups, seed)
    elif inner_mode == "oracle":
        if not task.backdoored:
            anomalies = make_pseudo_features(ref, max(k, 8), groups, seed)
        else:
            oracle_idx = trig_perm[n_query : n_query + max(k, 8)]
            t = task.triggered
            anomalies = compute_features(t.penultimate[oracle_idx], t.logits[oracle_idx], ref, groups, seed=seed)
    else:
        raise ValueError(f"inner_mode must be 'deployable' or 'oracle', got {inner_mode!r}")

    c, t = task.clean, task.triggered
    pen = torch.cat([c.penultimate[clean_q], t.penultimate[trig_q]])
    logits = torch.cat([c.logits[clean_q], t.logits[trig_q]])
    query = compute_features(pen, logits, ref, groups, seed=seed)
    labels = torch.cat([torch.zeros(len(clean_q)), torch.full((len(trig_q),), float(task.backdoored))])
    return Episode(support, anomalies, query, labels, task.model_id)
