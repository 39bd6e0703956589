"""Issue [3/5]: the inner loop's positives from the scan's trigger synthesis instead of pseudo-anomalies.

For every model of ``--zoo`` (clean ones included: they measure the false alarms), every ``k`` of ``--k`` and
``--seeds`` episodes (k clean support inputs; every other clean probe input and up to 64 triggered ones as the query,
`meta.episodes.draw_rows`), the detector is adapted three ways on the same support and scored on the same query:

- ``pseudo``: generic pseudo-anomalies in ψ space (``adapt(..., positives="pseudo")``);
- ``synthesized``: the support with the synthesized trigger of the class easiest to force
  (`metashield_hf.scan.positives.synthesized_positives`, the scan's own synthesis budget: what
  ``adapt(..., positives="synthesized")`` runs);
- ``oracle``: 20 truly triggered inputs outside the query (backdoored models only; deployment never has them);
- ``auto`` (derived, not a fourth adaptation): what ``adapt(..., positives="auto")`` runs on the model, synthesized
  for image and tensor models and pseudo for text.

Per domain and k: TPR@5%FPR and AUROC on the backdoored models, the FPR at the detector's calibrated threshold on every
model's clean query (mean and 90th percentile over episodes), the TPR at that threshold, and the synthesis seconds per
architecture. Writes ``--out`` ``.md`` / ``.json``; ``--resume`` skips episodes already in the ``.jsonl`` beside it.

    python benchmarks/input_detection/synthesized_positives.py --zoo artifacts/zoo/live_dev \
        --out benchmarks/input_detection/results/synthesized_positives/live_dev
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.evaluation.episodes import EpisodeLog, summarize_episodes
from metashield_hf.evaluation.metrics import auroc, rates, tpr_at_fpr
from metashield_hf.loading import load_detector
from metashield_hf.meta.episodes import draw_rows
from metashield_hf.scan.positives import positives_for, synthesized_positives
from metashield_hf.shield import adapt_from_activations
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

METHODS = ("pseudo", "synthesized", "auto", "oracle")


@dataclass
class SynthesizedPositivesArguments:
    zoo: str = field(metadata={"help": "Zoo folder."})
    out: str = field(metadata={"help": "Results path without suffix (.md, .json; episodes in .jsonl)."})
    k: str = field(default="10,20", metadata={"help": "Clean support sizes, comma-separated."})
    seeds: int = field(default=3, metadata={"help": "Episodes per model and k."})
    detector: str | None = field(default=None, metadata={"help": "One-pass detector folder (default: embedded)."})
    max_models: int | None = field(default=None, metadata={"help": "Score only the first N models (smoke runs)."})
    target_fpr: float = field(default=0.05, metadata={"help": "FPR the threshold is calibrated for."})


def episode(det, adapter, clean, triggered, k: int, seed: int, target_fpr: float) -> dict:
    """One support draw adapted three ways; the query's TPR@5%FPR, AUROC and rates at each calibrated threshold."""
    support, clean_q, pool = draw_rows(len(clean), len(triggered), k, seed, n_query=len(clean))
    items_s = adapter.prepare_items([clean[j] for j in support.tolist()])
    trig_q = [triggered[j] for j in pool[:64].tolist()]
    query = [clean[j] for j in clean_q.tolist()] + trig_q
    with torch.no_grad():
        out_s, out_q = adapter(items_s), adapter(adapter.prepare_items(query))
        oracle = adapter(adapter.prepare_items([triggered[j] for j in pool[64:84].tolist()])) if trig_q else None
    t = time.perf_counter()
    found = synthesized_positives(adapter, items_s, out_s, seed=seed)
    rec = {"k": len(items_s), "seed": seed, "synthesis_s": time.perf_counter() - t, "classes": found.classes,
           "modality": adapter.modality}  # fmt: skip
    y = np.r_[np.zeros(len(clean_q)), np.ones(len(trig_q))]
    w = adapter.head.weight.detach().float()
    b = None if adapter.head.bias is None else adapter.head.bias.detach().float()
    for name, positives in (("pseudo", None), ("synthesized", found.outputs), ("oracle", oracle)):
        if name == "oracle" and (oracle is None or len(oracle) == 0):
            continue
        shield = adapt_from_activations(det, out_s, w, b, steps=det.config.adapt_steps, lr=det.config.adapt_lr,
                                        seed=seed, target_fpr=target_fpr, anomaly_out=positives)  # fmt: skip
        s = shield.score_features(shield.features_of(out_q)[1]).numpy()
        r = {"fpr_at_threshold": float((s[: len(clean_q)] > shield.threshold).mean()),
             "expected_fpr": shield.fpr_estimate["mean"]}  # fmt: skip
        if trig_q:
            r |= {"tpr_at_5fpr": tpr_at_fpr(s, y, 0.05), "auroc": auroc(s, y),
                  "tpr_at_threshold": rates(s, y, shield.threshold)["tpr"]}  # fmt: skip
        rec[name] = r
    return rec


def summarize(records: list[dict]) -> dict:
    """Per (domain, k, method): means over backdoored episodes, FPR mean / p90 over every episode; ``auto`` is the
    method ``adapt(positives="auto")`` runs on each model."""
    with_auto = []
    for r in records:
        modality = r.get("modality", "text" if r["domain"] == "nlp" else "image")
        with_auto.append({**r, "auto": r[positives_for("auto", modality)]})  # what adapt(positives="auto") runs
    return summarize_episodes(with_auto, METHODS)


def report(args, records: list[dict], summary: dict) -> str:
    doms = sorted({r["domain"] for r in records}) + ["all"]
    ks = sorted({r["k"] for r in records})
    lines = [
        f"# Inner-loop positives: {Path(args.zoo).name}",
        "",
        f"{len({r['model_id'] for r in records})} models ({len({r['model_id'] for r in records if r['is_backdoored']})}"
        f" backdoored), k in {ks}, {args.seeds} episodes each; detector: {args.detector or 'embedded one-pass'}; "
        f"threshold calibrated for FPR {args.target_fpr} (quantile rule). TPR / AUROC: mean over backdoored models' "
        "episodes; FPR at the threshold: every model's held-out clean probe inputs, mean and 90th percentile over "
        "episodes. `gap closed` = (synthesized - pseudo) / (oracle - pseudo).",
        "",
        "| domain | k | positives | TPR@5%FPR | AUROC | TPR at threshold | FPR at threshold (mean / p90) | gap closed |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for dom in doms:
        for k in ks:
            for m in METHODS:
                c = summary.get(f"{dom}|{k}|{m}")
                if c is None:
                    continue
                gap = ""
                if m in ("synthesized", "auto") and f"{dom}|{k}|oracle" in summary and "tpr_at_5fpr" in c:
                    p, o = summary[f"{dom}|{k}|pseudo"]["tpr_at_5fpr"], summary[f"{dom}|{k}|oracle"]["tpr_at_5fpr"]
                    gap = f"{(c['tpr_at_5fpr'] - p) / (o - p):.2f}" if abs(o - p) > 1e-9 else "n/a"
                tpr, auc, at = (
                    f"{c[key]:.3f}" if key in c else "-" for key in ("tpr_at_5fpr", "auroc", "tpr_at_threshold")
                )
                lines.append(
                    f"| {dom} | {k} | {m} | {tpr} | {auc} | {at} | {c['fpr_mean']:.3f} / {c['fpr_p90']:.3f} | {gap} |"
                )
    arch = defaultdict(list)
    for r in records:
        arch[(r["architecture"], r["k"])].append(r["synthesis_s"])
    lines += ["", "Synthesis seconds per adaptation (the scan's default budget, 1 torch thread, this machine's CPU):", "",
              "| architecture | k | median s | max s |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {a} | {k} | {np.median(v):.2f} | {np.max(v):.2f} |" for (a, k), v in sorted(arch.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(SynthesizedPositivesArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    det = load_detector(args.detector, one_pass=True)
    zoo = load_zoo(args.zoo)
    meta = zoo.select_columns(["model_id", "domain", "architecture", "is_backdoored"]).to_list()
    if args.max_models:
        meta = meta[: args.max_models]
    out = Path(args.out)
    log = EpisodeLog(out)
    ks = [int(x) for x in args.k.split(",")]
    for i, m in enumerate(tqdm(meta, desc="models")):
        todo = log.todo(m["model_id"], ks, args.seeds)
        if not todo:
            continue
        row = zoo[i]
        adapter = row_to_target(row, batch_size=256)
        clean, triggered, _ = row_probe(row)
        if not m["is_backdoored"]:
            triggered = []
        for k, seed in todo:
            rec = {**m, **episode(det, adapter, clean, triggered, k, seed, args.target_fpr)}
            rec["k"] = k
            log.add(rec)
    records = log.records
    summary = summarize(records)
    text = report(args, records, summary)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
