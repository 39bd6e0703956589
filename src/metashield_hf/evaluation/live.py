"""Live episodes: one zoo model's few-shot episode with everything that needs the live model, computed once.

The activation cache holds one forward pass per probe input; the live probes and the baselines that perturb inputs
(STRIP, SCALE-UP, IBD-PSC, TED) need the model itself, and their outputs depend on the episode (the clean support is
what they compare with and draw overlays from). So each episode is computed from the zoo row and stored whole, keyed
by ``(model, k, seed)``: ψ and the live features of the support and the query, the inner loop's positives (generic
pseudo-anomalies; with ``synthesis``, the support carrying the scan's synthesized trigger, as
``adapt(positives="synthesized")`` makes them; for backdoored models, truly triggered inputs outside the query, the
``oracle`` ablation), and every baseline's query scores. Meta-training draws from these files (``episode_source``)
and evaluation scores every method on exactly the same episode.

The episode draw is the activation cache's (`metashield_hf.meta.episodes.make_episode`): the same support and query
rows for the same ``(k, seed)``, and a source-specific trigger's (TaCT) non-source rows left out of the positives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..baselines import BASELINES
from ..features import build_reference, compute_features, feature_names, loo_features, resolve_groups
from ..meta.episodes import Episode, draw_rows
from ..meta.inner import make_pseudo_features
from ..probes import DEFAULT_PROBE_PASSES, DEFAULT_PROBES, LiveEvidence
from ..scan.config import ScanConfig
from ..scan.positives import positives_for, synthesized_positives
from ..shield import adapt_from_activations
from ..targets.base import TargetAdapter, TargetOutput
from .scoring import firing_rows_of

logger = logging.getLogger(__name__)

__all__ = [
    "EPISODE_POSITIVES",
    "LIVE_EPISODE_BASELINES",
    "detector_columns",
    "episode_from_live",
    "live_episode",
    "live_episode_path",
    "load_live_episode",
    "score_live_episode",
]

# Every registered baseline runs on a live episode (those that only need activations too).
LIVE_EPISODE_BASELINES: tuple[str, ...] = tuple(BASELINES.list())
#: The inner-loop positives a live episode can hold: ``pseudo`` always, ``synthesized`` when computed with a synthesis
#: budget, ``oracle`` (true triggers; ablation only) for backdoored models; ``auto`` is what ``adapt(positives="auto")``
#: uses on the episode's modality. A missing or empty one falls back to pseudo.
EPISODE_POSITIVES = ("pseudo", "synthesized", "auto", "oracle")
ORACLE_ROWS = 20  # truly triggered inputs (outside the query) given to the oracle ablation's inner loop


def live_episode_path(folder: str | Path, model_id: str, k: int, seed: int) -> Path:
    return Path(folder) / model_id / f"k{k}_s{seed}.pt"


def live_episode(
    adapter: TargetAdapter,
    clean: Sequence,
    triggered: Sequence,
    labels: Sequence[int],
    meta: dict,
    k: int,
    seed: int,
    *,
    probes: Sequence[str] = DEFAULT_PROBES,
    probe_passes: int = DEFAULT_PROBE_PASSES,
    groups: Sequence[str] | None = None,
    n_query: int = 32,
    baselines: Sequence[str] = LIVE_EPISODE_BASELINES,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    synthesis: ScanConfig | None = None,
) -> dict:
    """Compute one live episode of a model.

    Args:
        adapter: the live target.
        clean, triggered, labels: the model's probe inputs (``row_probe``) and the clean ones' true labels.
        meta: the model's metadata (``model_id``, ``domain``, ``attack``, ``is_backdoored``, ``attack_params``).
        k, seed: the episode (support size, seed), drawn as the activation cache draws it.
        probes, probe_passes: the live evidence computed for the detector.
        groups: ψ feature groups (default: all).
        n_query: clean and triggered query inputs each.
        baselines: baselines scored on the same episode (a baseline that does not apply to the modality is skipped).
        rows: ``(support, clean query, triggered query)`` probe rows already drawn by the caller (`metashield
            evaluate`'s episodes, whose triggered query leaves out the oracle ablation's rows); default: drawn here.
        synthesis: also store the synthesized positives (`synthesized_positives` on the support with this budget,
            seeded by the episode's seed: what ``adapt(positives="synthesized", seed=seed)`` uses).

    Returns:
        A dict of tensors and facts: ``support (k, F)``, ``query (q, F)``, ``pseudo (m, F)`` (ψ then live features;
        ``synthesized`` and ``oracle`` likewise where computed, the live columns filled with the support's mean),
        ``labels (q,)``, ``feature_names``, ``scores`` (baseline name → ``(q,)``), ``seconds`` (per method), the
        support's activations and the head (what adaptation builds its reference from) and the row indices.
    """
    groups = resolve_groups(groups)
    if rows is None:
        support_idx, clean_q, pool = draw_rows(len(clean), len(triggered), k, seed, n_query)
        trig_q = pool[:n_query]
        trig_q = trig_q[firing_rows_of(meta, labels, trig_q)]  # TaCT: only the source classes' rows are positives
        oracle_idx = pool[n_query : n_query + ORACLE_ROWS]
        oracle_idx = oracle_idx[firing_rows_of(meta, labels, oracle_idx)]
    else:
        support_idx, clean_q, trig_q = rows
        oracle_idx = torch.zeros(0, dtype=torch.long)
    backdoored = bool(meta.get("is_backdoored", meta.get("attack") != "none"))
    seconds: dict[str, float] = {}
    items_s = adapter.prepare_items([clean[i] for i in support_idx.tolist()])
    items_q = adapter.prepare_items([clean[i] for i in clean_q.tolist()] + [triggered[i] for i in trig_q.tolist()])

    out_s = adapter(items_s, layers=True)
    t0 = time.perf_counter()
    out_q = adapter(items_q, layers=True)
    # the query's ordinary pass: what each method's cost is a multiple of
    seconds["forward"] = time.perf_counter() - t0
    head = adapter.head
    weight, bias = head.weight.detach().float(), None if head.bias is None else head.bias.detach().float()
    t0 = time.perf_counter()
    ref = build_reference(out_s.penultimate, out_s.logits, weight, bias)
    psi_s = loo_features(ref, groups, seed=seed)
    psi_q = compute_features(out_q.penultimate, out_q.logits, ref, groups, seed=seed)
    pseudo = make_pseudo_features(ref, max(len(items_s), 8), groups, seed)
    seconds["psi"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    evidence = LiveEvidence(probes, probe_passes=probe_passes, seed=seed).fit(adapter, items_s, out=out_s)
    live_s = evidence.support_features()
    live_q = evidence.features(items_q, out_q)
    seconds["live"] = time.perf_counter() - t0
    seconds |= {f"probe/{name}": t for name, t in evidence.seconds.items()}

    fill = live_s.mean(0, keepdim=True)
    positives = {"pseudo": torch.cat([pseudo, fill.expand(len(pseudo), -1)], 1)}
    facts: dict = {}
    if synthesis is not None:
        found = synthesized_positives(adapter, items_s, out_s, config=synthesis, seed=seed)
        seconds["synthesis"] = found.seconds
        facts["synthesized_classes"] = found.classes
        if found.outputs is not None:
            psi = compute_features(found.outputs.penultimate, found.outputs.logits, ref, groups, seed=seed)
            positives["synthesized"] = torch.cat([psi, fill.expand(len(psi), -1)], 1)
    if backdoored and len(oracle_idx):
        with torch.no_grad():
            out_o = adapter(adapter.prepare_items([triggered[i] for i in oracle_idx.tolist()]))
        psi = compute_features(out_o.penultimate, out_o.logits, ref, groups, seed=seed)
        positives["oracle"] = torch.cat([psi, fill.expand(len(psi), -1)], 1)

    scores = {}
    for name in baselines:
        if adapter.modality not in BASELINES.get(name).modalities:  # SCALE-UP amplifies pixels: not text
            continue
        t0 = time.perf_counter()
        base = BASELINES.build(name, seed=seed)
        base.fit(out_s, target=adapter, inputs=items_s, head_weight=weight, head_bias=bias)
        s = base.score(out_q, inputs=items_q)
        scores[name] = torch.as_tensor(np.asarray(s, dtype=np.float64))
        seconds[name] = time.perf_counter() - t0

    n_c = len(clean_q)
    return {
        "model_id": meta.get("model_id"),
        "k": len(support_idx),
        "seed": seed,
        "support": torch.cat([psi_s, live_s], 1),
        "query": torch.cat([psi_q, live_q], 1),
        **positives,
        **facts,
        "labels": torch.cat([torch.zeros(n_c), torch.full((len(trig_q),), float(backdoored))]),
        "n_clean": n_c,
        "feature_names": feature_names(groups) + evidence.feature_names,
        "scores": scores,
        "seconds": seconds,
        "extra_passes": evidence.extra_passes,
        "modality": adapter.modality,
        "support_penultimate": out_s.penultimate,
        "support_logits": out_s.logits,
        "head_weight": weight,
        "head_bias": bias,
        "support_index": support_idx,
        "query_clean_index": clean_q,
        "query_triggered_index": trig_q,
    }


def load_live_episode(path: str | Path) -> dict:
    """A stored live episode (``torch.load`` with ``weights_only=True``: tensors, numbers, strings and lists)."""
    return torch.load(path, weights_only=True)


def episode_positives(ep: dict, positives: str = "pseudo") -> torch.Tensor:
    """The inner loop's positives of a live episode: ``ep[positives]``, or the pseudo-anomalies where the episode has
    none of that kind (a clean model has no oracle; a synthesis that reached no class gave none)."""
    if positives not in EPISODE_POSITIVES:
        raise ValueError(f"positives must be one of {EPISODE_POSITIVES}, got {positives!r}")
    if positives == "auto":
        positives = positives_for("auto", ep.get("modality", "tensor"))
    got = ep.get(positives)
    return got if got is not None and len(got) else ep["pseudo"]


def episode_from_live(ep: dict, columns: Sequence[int] | None = None, positives: str = "pseudo") -> Episode:
    """A meta-training [`Episode`] from a live episode, keeping only ``columns`` of its features (default: all), with
    ``positives`` ([`episode_positives`]) as the inner loop's positives."""
    cols = slice(None) if columns is None else torch.as_tensor(list(columns))
    empty = torch.zeros(0, dtype=torch.long)
    return Episode(
        ep["support"][:, cols],
        episode_positives(ep, positives)[:, cols],
        ep["query"][:, cols],
        ep["labels"],
        ep["model_id"],
        ep["support_index"],
        ep["query_clean_index"],
        ep["query_triggered_index"],
        empty,
    )


def detector_columns(names: Sequence[str], probes: Sequence[str], groups: Sequence[str] | None = None) -> list[int]:
    """The columns of a live episode's features (``names``) that a detector reads, in its order: the ψ of ``groups``
    (default: all), then the features of ``probes``.

    Raises:
        ValueError: a feature the episode does not hold (it was computed with other probes).
    """
    want = feature_names(groups) + LiveEvidence(probes, probe_passes=10**6).feature_names
    missing = [n for n in want if n not in names]
    if missing:
        raise ValueError(f"the live episode lacks {len(missing)} features the detector reads, e.g. {missing[:3]}")
    return [list(names).index(n) for n in want]


def score_live_episode(
    detector, ep: dict, *, steps: int | None = None, lr: float | None = None, positives: str = "pseudo"
) -> tuple[np.ndarray, float]:
    """``(query scores, calibrated threshold)`` of a MetaShield detector adapted on a live episode's support, as
    `adapt` would adapt it on the live model (the episode's seed; ``steps`` / ``lr`` of the inner loop default to the
    detector's own; ``positives`` as in [`episode_positives`])."""
    cols = detector_columns(ep["feature_names"], detector.config.probes or [], detector.config.feature_groups)
    support = TargetOutput(ep["support_logits"], ep["support_penultimate"])
    shield = adapt_from_activations(
        detector,
        support,
        ep["head_weight"],
        ep["head_bias"],
        steps=detector.config.adapt_steps if steps is None else steps,
        lr=detector.config.adapt_lr if lr is None else lr,
        seed=int(ep["seed"]),
        reference_features=ep["support"][:, cols],
        anomaly_features=episode_positives(ep, positives)[:, cols],
    )
    return shield.score_features(ep["query"][:, cols]).numpy(), shield.threshold
