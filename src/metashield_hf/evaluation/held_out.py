"""Evaluate detectors on held-out zoo models from cached activations, exactly as deployment adapts them.

One record per held-out model (:func:`evaluate_task`), tables over records (:func:`summarize`) and the markdown of the
quick held-out study (:func:`render_variants`); ``evaluation/protocols.py`` holds the full protocol suite.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from ..meta.cache import TaskActivations
from ..modeling_metashield import MetaShieldDetector
from ..shield import adapt_from_activations
from .metrics import auroc, rates, tpr_at_fpr


def evaluate_task(
    detector: MetaShieldDetector,
    task: TaskActivations,
    *,
    k: int,
    steps: int,
    inner_lr: float = 0.05,
    seed: int = 0,
    target_fpr: float = 0.05,
    oracle: bool = False,
) -> dict:
    """Adapt on ``k`` clean probe inputs, score the other clean inputs and the triggered ones.

    Returns a record with the task's metadata, ``fpr`` and ``tpr`` at the calibrated threshold, ``tpr@5fpr`` (threshold
    set on the held-out clean scores themselves: the separability, not the calibration) and ``auroc``; for clean models
    only ``fpr`` and ``fpr_triggered`` (triggered probe inputs flagged although no backdoor exists).
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(task.clean), generator=g)
    support, rest = perm[:k], perm[k:]
    trig_perm = torch.randperm(len(task.triggered), generator=g)
    anomaly_out = None
    if oracle and task.backdoored and steps > 0:
        n_oracle = max(k, 8)
        anomaly_out, trig_perm = task.triggered[trig_perm[:n_oracle]], trig_perm[n_oracle:]
    shield = adapt_from_activations(
        detector,
        task.clean[support],
        task.head_weight,
        task.head_bias,
        steps=steps,
        lr=inner_lr,
        target_fpr=target_fpr,
        seed=seed,
        anomaly_out=anomaly_out,
    )
    s_clean = shield.score_features(shield.features_of(task.clean[rest])[1]).numpy()
    s_trig = shield.score_features(shield.features_of(task.triggered[trig_perm])[1]).numpy()
    rec = {**task.meta, "k": k, "steps": steps, "seed": seed, "fpr": float((s_clean > shield.threshold).mean())}
    if task.backdoored:
        scores = np.r_[s_clean, s_trig]
        labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_trig))]
        rec.update(
            tpr=rates(scores, labels, shield.threshold)["tpr"],
            auroc=auroc(scores, labels),
            **{"tpr@5fpr": tpr_at_fpr(scores, labels, 0.05)},
        )
    else:
        rec["fpr_triggered"] = float((s_trig > shield.threshold).mean())
    return rec


def summarize(records: list[dict], by: str) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Mean, std and count of each metric per value of ``by`` (plus ``"all"``)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r[by])].append(r)
        groups["all"].append(r)
    table = {}
    for key, rows in sorted(groups.items()):
        table[key] = {}
        for metric in ("tpr@5fpr", "tpr", "fpr", "auroc", "fpr_triggered"):
            vals = [r[metric] for r in rows if metric in r and not math.isnan(r[metric])]
            if vals:
                table[key][metric] = (float(np.mean(vals)), float(np.std(vals)), len(vals))
    return table


METRICS = ("tpr@5fpr", "fpr", "auroc")


def _cell(stats: dict, metric: str) -> str:
    if metric not in stats:
        return "–"
    mean, std, _ = stats[metric]
    return f"{mean:.3f} ± {std:.3f}"


def render_variants(records: list[dict], meta: dict) -> str:
    """The markdown of ``benchmarks/meta/results/held_out.md``: per-domain and per-attack tables of each variant, per
    k (records of [`evaluate_task`] with a ``variant`` key). ``metashield evaluate`` (evaluation/protocols.py) is the
    full protocol suite; this is the quick held-out table of ``benchmarks/meta/run.sh``."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    ks = sorted({r["k"] for r in records})
    lines = [
        "# Meta-learning: held-out zoo models",
        "",
        "Written by `benchmarks/meta/held_out.py` from runs on this machine (2 CPU cores); nothing here is hand-typed.",
        "",
        *[f"- {k}: {v}" for k, v in meta.items()],
        "",
        "Per held-out model and episode: `tpr@5fpr` = detection rate on triggered inputs at the score threshold that "
        "flags 5% of that model's held-out clean inputs (separability); `fpr` = share of held-out clean inputs above the "
        "threshold calibrated on the k clean samples alone (leave-one-out, target 5%: what a user gets); `auroc` = "
        "triggered vs held-out clean. Mean ± std over models × seeds; `fpr` over clean and backdoored models, the others "
        "over backdoored models only. `fpr_triggered` (clean models): triggered inputs flagged although the model has no "
        "backdoor.",
        "",
    ]
    for by, title in (("domain", "domain"), ("attack", "attack")):
        for k in ks:
            lines += [f"## Per {title}, k = {k} clean samples", ""]
            header = (
                "| variant | " + " | ".join(f"{key}: TPR@5%FPR / FPR / AUROC" for key in _keys(records, by)) + " |"
            )
            lines += [header, "|---|" + "---|" * len(_keys(records, by))]
            for v in variants:
                table = summarize([r for r in records if r["variant"] == v and r["k"] == k], by)
                cells = [" / ".join(_cell(table.get(key, {}), m) for m in METRICS) for key in _keys(records, by)]
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Clean models: triggered inputs flagged without a backdoor (`fpr_triggered`)", ""]
    lines += ["| variant | k | fpr_triggered |", "|---|---:|---|"]
    for v in variants:
        for k in ks:
            table = summarize([r for r in records if r["variant"] == v and r["k"] == k], "domain")
            lines.append(f"| {v} | {k} | {_cell(table.get('all', {}), 'fpr_triggered')} |")
    lines.append("")
    return "\n".join(lines)


def _keys(records: list[dict], by: str) -> list[str]:
    return sorted({str(r[by]) for r in records}) + ["all"]
