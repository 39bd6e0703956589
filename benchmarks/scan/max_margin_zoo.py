"""Issue #32, a first look: how well the max-margin statistic alone (MM-BD) separates a zoo's backdoored image / FL
models from its clean ones, and whether its top class is the backdoor's target.

For every cv and fl model of ``--zoo``: `metashield_hf.scan.max_margin.max_margins` on the first ``--n`` clean probe
inputs with the scan's defaults (``ScanConfig().max_margin_steps`` / ``max_margin_starts``), then
`max_margin_signals`. Prints and writes (``--out`` ``.md`` / ``.json``) the AUROC of ``max_margin_excess`` over
backdoored vs clean models, and how often the class with the largest margin is the target.

    python benchmarks/scan/max_margin_zoo.py --zoo artifacts/zoo/live_dev --out benchmarks/scan/results/max_margin_live_dev
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from transformers import HfArgumentParser

from metashield_hf.scan import ScanConfig
from metashield_hf.scan.max_margin import max_margins
from metashield_hf.scan.signals import max_margin_signals
from metashield_hf.zoo import load_zoo, row_probe, row_to_target


@dataclass
class MaxMarginZooArguments:
    zoo: str = field(metadata={"help": "Zoo folder."})
    out: str = field(metadata={"help": "Results path without suffix (.md, .json)."})
    n: int = field(default=20, metadata={"help": "Clean probe inputs per model."})
    seed: int = field(default=0, metadata={"help": "Seeds the random starts."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(MaxMarginZooArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    config = ScanConfig()
    rows = []
    for row in load_zoo(args.zoo):
        if row["domain"] == "nlp":
            continue
        adapter = row_to_target(row)
        clean, _, _ = row_probe(row)
        items = adapter.prepare_items(clean[: args.n])
        with torch.no_grad():
            k = adapter(items[:2]).logits.shape[1]
        res = max_margins(adapter, items, k, steps=config.max_margin_steps, starts=config.max_margin_starts,
                          seed=args.seed)  # fmt: skip
        margins = np.asarray(res.margins, dtype=np.float64)
        rows.append({"model_id": row["model_id"], "domain": row["domain"], "attack": row["attack"],
                     "backdoored": bool(row["is_backdoored"]), "target": int(row["target_label"]),
                     "top_class": int(np.argmax(margins)), **max_margin_signals(margins)})  # fmt: skip
    y = [r["backdoored"] for r in rows]
    auroc = float(roc_auc_score(y, [r["max_margin_excess"] for r in rows])) if 0 < sum(y) < len(y) else None
    bd = [r for r in rows if r["backdoored"]]
    hits = sum(r["top_class"] == r["target"] for r in bd)
    lines = [f"# Max-margin statistic alone: {Path(args.zoo).name}", "",
             f"{len(rows)} cv / fl models ({len(bd)} backdoored), {args.n} clean probe inputs each, "
             f"{config.max_margin_steps} steps x {config.max_margin_starts} starts. AUROC of `max_margin_excess`: "
             f"{'-' if auroc is None else f'{auroc:.3f}'}; the largest margin is the target's in {hits} of {len(bd)}.",
             "", "| model | attack | target | top class | max_margin_excess |", "|---|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['model_id']} | {r['attack']} | {r['target']} | {r['top_class']} | {r['max_margin_excess']:.3f} |"
              for r in rows]  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "auroc": auroc, "target_hits": hits,
                                                    "rows": rows}, indent=1))  # fmt: skip
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
