"""Issue [3/5]: text models' inner-loop positives from the scan's token triggers, against pseudo-anomalies.

``adapt(..., positives="auto")`` gives text models pseudo-anomalies: the text synthesis runs in embedding space, and
its positives cost text models detection. A scan's token search finds real tokens instead, and
``report.shield(detector, model, clean)`` (``adapt(..., scan_report=report)``) inserts the token trigger of the
scan's suspected target into the clean samples as the positives. For every text model of ``--zoo`` (clean ones
included), every ``k`` of ``--k`` and ``--seeds`` episodes (k clean support inputs; every other clean probe input and
up to 64 triggered ones as the query, `meta.episodes.draw_rows`), the support is scanned with the default
``ScanConfig`` and the detector adapted both ways on it. Per k: TPR@5%FPR, AUROC, TPR and FPR at the calibrated
threshold, the scan's seconds, and how often the scan's suspected target is the backdoor's. Writes ``--out``
``.md`` / ``.json``; finished episodes are kept in the ``.jsonl`` beside it and skipped on a rerun.

    python benchmarks/input_detection/token_positives.py --zoo artifacts/zoo/live_dev \
        --out benchmarks/input_detection/results/token_positives/live_dev
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf import adapt, scan_model
from metashield_hf.evaluation.episodes import EpisodeLog, summarize_episodes
from metashield_hf.evaluation.metrics import auroc, rates, tpr_at_fpr
from metashield_hf.loading import load_detector
from metashield_hf.meta.episodes import draw_rows
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

METHODS = ("pseudo", "token_triggers")


@dataclass
class TokenPositivesArguments:
    zoo: str = field(metadata={"help": "Zoo folder."})
    out: str = field(metadata={"help": "Results path without suffix (.md, .json; episodes in .jsonl)."})
    k: str = field(default="20", metadata={"help": "Clean support sizes, comma-separated."})
    seeds: int = field(default=2, metadata={"help": "Episodes per model and k."})
    detector: str | None = field(default=None, metadata={"help": "One-pass detector folder (default: embedded)."})
    target_fpr: float = field(default=0.05, metadata={"help": "FPR the threshold is calibrated for."})


def episode(det, adapter, clean, triggered, k: int, seed: int, target_fpr: float) -> dict:
    support, clean_q, pool = draw_rows(len(clean), len(triggered), k, seed, n_query=len(clean))
    items_s = [clean[j] for j in support.tolist()]
    trig_q = [triggered[j] for j in pool[:64].tolist()]
    query = [clean[j] for j in clean_q.tolist()] + trig_q
    y = np.r_[np.zeros(len(clean_q)), np.ones(len(trig_q))]
    t = time.perf_counter()
    report = scan_model(adapter, items_s, seed=seed)
    rec = {"k": len(items_s), "seed": seed, "scan_s": time.perf_counter() - t, "verdict": report.verdict,
           "suspected_target": report.suspected_target}  # fmt: skip
    shields = {"pseudo": adapt(det, adapter, items_s, seed=seed, target_fpr=target_fpr, positives="pseudo"),
               "token_triggers": report.shield(det, adapter, items_s, seed=seed, target_fpr=target_fpr)}  # fmt: skip
    rec["source"] = shields["token_triggers"].positives.source if shields["token_triggers"].positives else None
    for name, shield in shields.items():
        with torch.no_grad():
            s = shield.score(query)
        r = {"fpr_at_threshold": float((s[: len(clean_q)] > shield.threshold).mean())}
        if trig_q:
            r |= {"tpr_at_5fpr": tpr_at_fpr(s, y, 0.05), "auroc": auroc(s, y),
                  "tpr_at_threshold": rates(s, y, shield.threshold)["tpr"]}  # fmt: skip
        rec[name] = r
    return rec


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(TokenPositivesArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    det = load_detector(args.detector, one_pass=True)
    zoo = load_zoo(args.zoo)
    meta = zoo.select_columns(
        ["model_id", "domain", "architecture", "attack", "is_backdoored", "target_label"]
    ).to_list()
    rows = [i for i, m in enumerate(meta) if m["domain"] == "nlp"]
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
        clean, triggered, _ = row_probe(row)
        if not m["is_backdoored"]:
            triggered = []
        for k, seed in todo:
            log.add({**m, **episode(det, adapter, clean, triggered, k, seed, args.target_fpr)})
    records = log.records
    summary = {key.split("|", 1)[1]: cell for key, cell in summarize_episodes(records, METHODS).items()
               if key.startswith("all|")}  # fmt: skip
    bd = [r for r in records if r["is_backdoored"]]
    hits = [r["suspected_target"] == r["target_label"] for r in bd]
    lines = [f"# Token-trigger positives for text models: {Path(args.zoo).name}", "",
             f"{len({r['model_id'] for r in records})} text models ({len({r['model_id'] for r in bd})} backdoored), "
             f"k in {ks}, {args.seeds} episodes each; detector: {args.detector or 'embedded one-pass'}; threshold "
             f"for FPR {args.target_fpr}. The scan's suspected target is the backdoor's in {sum(hits)} of "
             f"{len(hits)} backdoored episodes; positives came from token triggers in "
             f"{sum(r['source'] == 'token_triggers' for r in records)} of {len(records)} episodes; scan median "
             f"{np.median([r['scan_s'] for r in records]):.1f} s.", "",
             "| k | positives | TPR@5%FPR | AUROC | TPR at threshold | FPR at threshold (mean / p90) |",
             "|---:|---|---:|---:|---:|---|"]  # fmt: skip
    fmt = lambda c, key: f"{c[key]:.3f}" if key in c else "-"  # noqa: E731
    for key, c in summary.items():
        k, m = key.split("|")
        lines.append(f"| {k} | {m} | {fmt(c, 'tpr_at_5fpr')} | {fmt(c, 'auroc')} | {fmt(c, 'tpr_at_threshold')} | "
                     f"{c['fpr_mean']:.3f} / {c['fpr_p90']:.3f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
