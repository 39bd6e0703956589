"""Does the calibrated threshold keep its promise? The FPR and TPR at the threshold over many draws of clean samples.

For every model of the given activation caches (one file per zoo model, `metashield_hf.meta.cache`), for each ``k``
and ``--draws`` seeds: a support of ``k`` clean probe inputs is drawn (`meta.episodes.draw_rows`), the detector is
adapted on it as `adapt` does (its own inner loop; pseudo-anomalies), and every other clean probe input and every
triggered one whose clean twin is not in the support is scored. At the threshold calibrated on the support (the
leave-one-out clean scores' ``1 - target_fpr`` quantile, or the conformal rank with ``--calibration conformal``):

- the FPR on the held-out clean inputs (every model, clean ones included): its mean and 90th percentile over draws;
- the TPR on the triggered inputs (backdoored models), beside the TPR at 5% FPR with the threshold set on the query's
  own clean scores (what the ranking allows): how much of the ranking the decision loses.

With ``--augmented`` (a folder `augmented_cache.py` wrote), every rule also runs on the leave-one-out scores pooled
with the scores of the support's augmented copies (``adapt(..., calibration_copies=)``), as rows ``RULE+aug``.

    python benchmarks/calibration/threshold_fpr.py --caches artifacts/live/dev/cache \
        --out benchmarks/calibration/results/shipped_detector_live_dev
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf import MetaShieldDetector
from metashield_hf.evaluation.metrics import tpr_at_fpr
from metashield_hf.evaluation.scoring import firing_rows
from metashield_hf.loading import DEFAULT_DETECTOR_DIR
from metashield_hf.meta.cache import load_task
from metashield_hf.meta.episodes import draw_rows
from metashield_hf.shield import adapt_from_activations, calibrate_threshold
from metashield_hf.targets.base import TargetOutput


@dataclass
class ThresholdArguments:
    caches: list[str] = field(metadata={"help": "Activation cache folders (every model in them is scored)."})
    out: str = field(metadata={"help": "Results path without suffix (.json and .md)."})
    detector: str = field(default=str(DEFAULT_DETECTOR_DIR), metadata={"help": "A one-pass detector folder."})
    k: str = field(default="5,10,20", metadata={"help": "Support sizes."})
    draws: int = field(default=20, metadata={"help": "Support draws (seeds) per model and k."})
    target_fpr: float = field(default=0.05, metadata={"help": "The false-positive rate the threshold aims at."})
    calibration: str = field(default="quantile,conformal", metadata={"help": "Threshold rules to compare."})
    augmented: str | None = field(
        default=None,
        metadata={"help": "Folder of augmented copies' activations (augmented_cache.py): each rule is also applied to "
                  "the leave-one-out scores pooled with the support's copies' scores (rows named RULE+aug)."},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ThresholdArguments).parse_args_into_dataclasses(args=argv)
    args.detector = os.path.relpath(args.detector)  # results name paths relative to the repository
    torch.set_num_threads(1)
    det = MetaShieldDetector.from_pretrained(args.detector).eval()
    if det.config.probes:
        raise ValueError(f"{args.detector} reads live probes; this study scores cached activations (one-pass only)")
    ks = [int(x) for x in args.k.split(",")]
    rules = args.calibration.split(",")
    base_rules = list(rules)
    if args.augmented:
        rules += [f"{r}+aug" for r in base_rules]
    files = sorted(p for c in args.caches for p in Path(c).glob("*.safetensors"))
    records = []
    for path in tqdm(files, desc="models"):
        task = load_task(path)
        c, t = task.clean, task.triggered
        aug = load_file(Path(args.augmented) / path.name) if args.augmented else None
        for k in ks:
            for seed in range(args.draws):
                support, clean_q, pool = draw_rows(len(c), len(t), k, seed, n_query=len(c))
                pool = pool[firing_rows(task, pool)]
                aug_out, origin = None, None
                if aug is not None:  # the support's copies, their origins renumbered to support positions
                    position = torch.full((len(c),), -1, dtype=torch.long)
                    position[torch.as_tensor(support)] = torch.arange(len(support))
                    keep = position[aug["origin"]] >= 0
                    aug_out = TargetOutput(aug["logits"][keep], aug["penultimate"][keep])
                    origin = position[aug["origin"][keep]]
                shield = adapt_from_activations(
                    det, TargetOutput(c.logits[support], c.penultimate[support]), task.head_weight, task.head_bias,
                    steps=det.config.adapt_steps, lr=det.config.adapt_lr, target_fpr=args.target_fpr, seed=seed,
                    augmented_out=aug_out, augmented_origin=origin,
                )  # fmt: skip
                out = TargetOutput(torch.cat([c.logits[clean_q], t.logits[pool]]),
                                   torch.cat([c.penultimate[clean_q], t.penultimate[pool]]))  # fmt: skip
                s = shield.score_features(shield.features_of(out)[1]).numpy()
                neg, pos = s[: len(clean_q)], s[len(clean_q) :]
                rec = {"model_id": task.model_id, "domain": task.meta["domain"], "attack": task.meta["attack"],
                       "backdoored": task.backdoored, "k": len(support), "seed": seed, "n_clean": len(neg),
                       "n_triggered": len(pos) if task.backdoored else 0}  # fmt: skip
                for rule in rules:
                    scores = shield.calibration_scores
                    if rule.endswith("+aug"):
                        scores = np.concatenate([scores, shield.augmented_scores])
                    thr = calibrate_threshold(scores, args.target_fpr, rule.removesuffix("+aug"))
                    rec[f"fpr/{rule}"] = float((neg > thr).mean())
                    if task.backdoored and len(pos):
                        rec[f"tpr/{rule}"] = float((pos > thr).mean())
                if task.backdoored and len(pos):
                    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
                    rec["tpr@5fpr"] = tpr_at_fpr(np.r_[neg, pos], y, 0.05)
                records.append(rec)

    summary: dict = defaultdict(dict)
    for dom in sorted({r["domain"] for r in records}) + ["all"]:
        for k in ks:
            rows = [r for r in records if dom in (r["domain"], "all") and r["k"] == k]
            if not rows:
                continue
            cell = {"models": len({r["model_id"] for r in rows}), "draws": len(rows)}
            bd = [r for r in rows if "tpr@5fpr" in r]
            cell["tpr@5fpr"] = float(np.mean([r["tpr@5fpr"] for r in bd])) if bd else None
            for rule in rules:
                f = np.array([r[f"fpr/{rule}"] for r in rows])
                cell[rule] = {"fpr_mean": float(f.mean()), "fpr_p90": float(np.quantile(f, 0.9)),
                              "fpr_max": float(f.max()),
                              "tpr": float(np.mean([r[f"tpr/{rule}"] for r in bd])) if bd else None}  # fmt: skip
            summary[dom][k] = cell

    lines = [f"# The calibrated threshold over {args.draws} draws of clean samples per model",
             "", f"Detector `{args.detector}`; caches {', '.join(f'`{c}`' for c in args.caches)}; target FPR "
             f"{args.target_fpr}. FPR on every other clean probe input of every model (clean models included): mean, "
             "90th percentile and max over draws × models; TPR on the triggered inputs at the same threshold "
             "(backdoored models) beside TPR@5%FPR with the threshold set on the query's clean scores.", "",
             "| domain | k | models | rule | FPR mean | FPR p90 | FPR max | TPR at threshold | TPR@5%FPR |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for dom, per_k in summary.items():
        for k, cell in per_k.items():
            for rule in rules:
                r = cell[rule]
                lines.append(f"| {dom} | {k} | {cell['models']} | {rule} | {fmt(r['fpr_mean'])} | {fmt(r['fpr_p90'])} "
                             f"| {fmt(r['fpr_max'])} | {fmt(r['tpr'])} | {fmt(cell['tpr@5fpr'])} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "summary": summary, "records": records}))
    print(text)


if __name__ == "__main__":
    main()
