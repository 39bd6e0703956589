"""Issue [3/5]: the erase check of the synthesized trigger beside the adapted detector, on live zoo models.

For every image and tensor model of ``--zoo`` (clean ones included: they measure the false alarms), every ``k`` of
``--k`` and ``--seeds`` episodes (k clean support inputs; every other clean probe input and up to 64 triggered ones
as the query, `meta.episodes.draw_rows`), the detector is adapted as ``adapt`` does by default (positives ``auto``:
the scan's synthesis on the support), then scored two ways on the same query:

- ``detector``: the adapted detector alone (``adapt(..., erase="off")``), threshold from the leave-one-out scores;
- ``erase``: what ``adapt(..., erase="auto")`` gives: the erase check (`metashield_hf.scan.erase.EraseCheck`) built
  from the synthesized trigger and switched on by `metashield_hf.shield.use_erase` unless erasing moves the clean
  support; each score is the larger of the detector's and the check's probability drop, recalibrated.

Per domain and k: TPR@5%FPR and AUROC (backdoored models), TPR at the calibrated threshold, the FPR at that threshold on
every model's held-out clean probe inputs (mean and 90th percentile over episodes), and how often the check was on
(backdoored / clean models). Writes ``--out`` ``.md`` / ``.json``; finished episodes are kept in the ``.jsonl`` beside
it and skipped on a rerun.

    python benchmarks/input_detection/erase_check.py --zoo artifacts/zoo/live_dev \
        --out benchmarks/input_detection/results/erase_check/live_dev
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

from metashield_hf import adapt
from metashield_hf.evaluation.episodes import EpisodeLog, summarize_episodes
from metashield_hf.evaluation.metrics import auroc, rates, tpr_at_fpr
from metashield_hf.loading import load_detector
from metashield_hf.meta.episodes import draw_rows
from metashield_hf.scan.erase import EraseCheck
from metashield_hf.shield import use_erase
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

METHODS = ("detector", "erase")


@dataclass
class EraseCheckArguments:
    zoo: str = field(metadata={"help": "Zoo folder."})
    out: str = field(metadata={"help": "Results path without suffix (.md, .json; episodes in .jsonl)."})
    k: str = field(default="10,20", metadata={"help": "Clean support sizes, comma-separated."})
    seeds: int = field(default=3, metadata={"help": "Episodes per model and k."})
    detector: str | None = field(default=None, metadata={"help": "One-pass detector folder (default: embedded)."})
    max_models: int | None = field(default=None, metadata={"help": "Score only the first N models (smoke runs)."})
    target_fpr: float = field(default=0.05, metadata={"help": "FPR the threshold is calibrated for."})


def rates_of(s: np.ndarray, n_clean: int, threshold: float, y: np.ndarray, triggered: bool) -> dict:
    r = {"fpr_at_threshold": float((s[:n_clean] > threshold).mean())}
    if triggered:
        r |= {
            "tpr_at_5fpr": tpr_at_fpr(s, y, 0.05),
            "auroc": auroc(s, y),
            "tpr_at_threshold": rates(s, y, threshold)["tpr"],
        }
    return r


def episode(det, adapter, clean, triggered, k: int, seed: int, target_fpr: float) -> dict:
    """One support draw: the default adaptation, scored without and with the erase check."""
    support, clean_q, pool = draw_rows(len(clean), len(triggered), k, seed, n_query=len(clean))
    items_s = adapter.prepare_items([clean[j] for j in support.tolist()])
    trig_q = [triggered[j] for j in pool[:64].tolist()]
    items_q = adapter.prepare_items([clean[j] for j in clean_q.tolist()] + trig_q)
    y = np.r_[np.zeros(len(clean_q)), np.ones(len(trig_q))]
    t = time.perf_counter()
    shield = adapt(det, adapter, items_s, seed=seed, target_fpr=target_fpr, erase="off")
    rec = {"k": len(items_s), "seed": seed, "adapt_s": time.perf_counter() - t, "modality": adapter.modality,
           "classes": shield.positives.classes if shield.positives else []}  # fmt: skip
    with torch.no_grad():
        out_q, s_det = shield.scored(items_q)
    s_det = s_det.numpy()
    rec["detector"] = rates_of(s_det, len(clean_q), shield.threshold, y, bool(trig_q))
    t = time.perf_counter()
    check, note = EraseCheck.from_positives(adapter, items_s, shield.positives)
    on = False
    if check is not None:
        with torch.no_grad():
            on = use_erase(shield, check, check.drops(adapter, items_s))
        note = shield.erase_note
    s = s_det
    if on:
        s = np.maximum(s_det, check.drops(adapter, items_q, out_q.logits))
    rec["erase"] = rates_of(s, len(clean_q), shield.threshold, y, bool(trig_q)) | {"on": on, "note": note}
    rec["erase_s"] = time.perf_counter() - t
    return rec


def summarize(records: list[dict]) -> dict:
    """Per (domain, k, method): means over backdoored episodes, FPR mean / p90 over every episode, and for the erase
    check the share of episodes it was on, on backdoored and on clean models."""
    out = summarize_episodes(records, METHODS)
    on: dict = defaultdict(list)
    for r in records:
        for dom in (r["domain"], "all"):
            on[(dom, r["k"], "on_backdoored" if r["is_backdoored"] else "on_clean")].append(r["erase"]["on"])
    for (dom, k, key), values in on.items():
        out[f"{dom}|{k}|erase"][key] = float(np.mean(values))
    return out


def report(args, records: list[dict], summary: dict) -> str:
    doms = sorted({r["domain"] for r in records}) + ["all"]
    ks = sorted({r["k"] for r in records})
    n_models = len({r["model_id"] for r in records})
    n_bd = len({r["model_id"] for r in records if r["is_backdoored"]})
    lines = [
        f"# The erase check: {Path(args.zoo).name}",
        "",
        f"{n_models} image / tensor models ({n_bd} backdoored), k in {ks}, {args.seeds} episodes each; detector: "
        f"{args.detector or 'embedded one-pass'}, positives `auto`; threshold calibrated for FPR {args.target_fpr} "
        "(quantile rule). TPR / AUROC: mean over backdoored models' episodes; FPR at the threshold: every model's "
        "held-out clean probe inputs, mean and 90th percentile over episodes; `on`: share of episodes with the check "
        "on, backdoored / clean models.",
        "",
        "| domain | k | scores | TPR@5%FPR | AUROC | TPR at threshold | FPR at threshold (mean / p90) | on |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    fmt = lambda c, key: f"{c[key]:.3f}" if key in c else "-"  # noqa: E731
    for dom in doms:
        for k in ks:
            for m in METHODS:
                c = summary.get(f"{dom}|{k}|{m}")
                if c is None:
                    continue
                on = f"{fmt(c, 'on_backdoored')} / {fmt(c, 'on_clean')}" if m == "erase" else ""
                lines.append(
                    f"| {dom} | {k} | {m} | {fmt(c, 'tpr_at_5fpr')} | {fmt(c, 'auroc')} | {fmt(c, 'tpr_at_threshold')} "
                    f"| {c['fpr_mean']:.3f} / {c['fpr_p90']:.3f} | {on} |"
                )
    per_attack = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["is_backdoored"] and "tpr_at_threshold" in r["erase"]:
            for m in METHODS:
                per_attack[(r["attack"], r["k"])][m].append(r[m]["tpr_at_threshold"])
            per_attack[(r["attack"], r["k"])]["on"].append(r["erase"]["on"])
    lines += ["", "TPR at the threshold per attack (backdoored models' episodes):", "",
              "| attack | k | detector | erase | check on |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for (a, k), c in sorted(per_attack.items()):
        lines.append(
            f"| {a} | {k} | {np.mean(c['detector']):.3f} | {np.mean(c['erase']):.3f} | {np.mean(c['on']):.2f} |"
        )
    secs = defaultdict(list)
    for r in records:
        secs[(r["architecture"], r["k"])].append((r["adapt_s"], r["erase_s"]))
    lines += ["", "Seconds per adaptation (1 torch thread, this machine's CPU): the default adaptation with its "
              "synthesis, and the erase check's gate on the support:", "",
              "| architecture | k | adapt median s | erase gate median s |", "|---|---:|---:|---:|"]  # fmt: skip
    for (a, k), v in sorted(secs.items()):
        v = np.array(v)
        lines.append(f"| {a} | {k} | {np.median(v[:, 0]):.2f} | {np.median(v[:, 1]):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(EraseCheckArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    det = load_detector(args.detector, one_pass=True)
    zoo = load_zoo(args.zoo)
    meta = zoo.select_columns(["model_id", "domain", "architecture", "attack", "is_backdoored"]).to_list()
    rows = [i for i, m in enumerate(meta) if m["domain"] != "nlp"]
    if args.max_models:
        rows = rows[: args.max_models]
    out = Path(args.out)
    log = EpisodeLog(out)
    ks = [int(x) for x in args.k.split(",")]
    for i in tqdm(rows, desc="models"):
        m = meta[i]
        todo = log.todo(m["model_id"], ks, args.seeds)
        if not todo:
            continue
        row = zoo[i]
        adapter = row_to_target(row, batch_size=256)
        if adapter.modality == "text":
            continue
        clean, triggered, _ = row_probe(row)
        if not m["is_backdoored"]:
            triggered = []
        for k, seed in todo:
            log.add({**m, **episode(det, adapter, clean, triggered, k, seed, args.target_fpr)})
    records = log.records
    summary = summarize(records)
    text = report(args, records, summary)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
