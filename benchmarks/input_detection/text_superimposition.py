"""How text should be superimposed for STRIP's statistic: one study on the text models of a zoo.

For each backdoored text model, ``--seeds`` draws of a ``--k``-input clean support (the overlays), 64 other clean and
64 triggered query inputs; each query input gets ``--copies`` superimposed copies per way of superimposing, and its
score is minus the mean per-copy prediction entropy (STRIP's). Ways compared:

- ``replace``: each input word replaced with probability 0.5 by an overlay word (STRIP's text; `mix_words`);
- ``splice``: each overlay word inserted with probability 0.5 at a random place, no input word lost (`splice_words`);
- ``splice_all``: every overlay word inserted;
- ``append``: the overlay sentence after the input;
- ``drop``: 30% of the input's words deleted, no overlay.

Prints and writes TPR@5%FPR and AUROC per model and their mean (``--out``: ``.md`` and ``.json``).

    python benchmarks/input_detection/text_superimposition.py --zoo artifacts/zoo/live_dev \
        --out benchmarks/input_detection/results/live_evidence/text_superimposition_dev
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc, tpr_at_fpr
from metashield_hf.probes import prediction_entropy
from metashield_hf.targets.perturb import mix_words, splice_words
from metashield_hf.zoo import load_zoo, row_probe, row_to_target


@dataclass
class TextSuperimpositionArguments:
    zoo: str = field(metadata={"help": "Zoo folder whose backdoored text models are scored."})
    out: str = field(metadata={"help": "Results path without suffix (.json and .md)."})
    k: int = field(default=20, metadata={"help": "Clean support inputs (the overlays)."})
    copies: int = field(default=6, metadata={"help": "Superimposed copies per query input."})
    seeds: int = field(default=3, metadata={"help": "Support draws per model."})
    n_query: int = field(default=64, metadata={"help": "Clean and triggered query inputs each."})


def ways(x: str, overlay: str, rng: np.random.Generator) -> dict[str, str]:
    words = x.split()
    return {
        "replace": mix_words(x, overlay, 0.5, rng),
        "splice": splice_words(x, overlay, 0.5, rng),
        "splice_all": splice_words(x, overlay, 1.0, rng),
        "append": f"{x} {overlay}",
        "drop": " ".join(w for w in words if rng.random() > 0.3) or x,
    }


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(TextSuperimpositionArguments).parse_args_into_dataclasses(args=argv)
    zoo = load_zoo(args.zoo)
    ids = zoo.select_columns(["model_id", "domain", "is_backdoored"]).to_list()
    rows = [i for i, m in enumerate(ids) if m["domain"] == "nlp" and m["is_backdoored"]]
    records = []
    for i in tqdm(rows, desc="text models"):
        row = zoo[i]
        adapter = row_to_target(row, batch_size=256)
        clean, triggered, _ = row_probe(row)
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(clean))
            support = [clean[j] for j in order[: args.k]]
            query = [clean[j] for j in order[args.k : args.k + args.n_query]] + list(triggered[: args.n_query])
            y = np.r_[
                np.zeros(len(query) - min(args.n_query, len(triggered))), np.ones(min(args.n_query, len(triggered)))
            ]
            copies: dict[str, list[str]] = {}
            for x in query:
                for _ in range(args.copies):
                    for name, text in ways(x, support[rng.integers(len(support))], rng).items():
                        copies.setdefault(name, []).append(text)
            for name, texts in copies.items():
                with torch.no_grad():
                    ent = prediction_entropy(adapter(texts).logits).reshape(len(query), args.copies).mean(1).numpy()
                records.append({"model_id": row["model_id"], "attack": row["attack"], "seed": seed, "way": name,
                                "tpr@5fpr": tpr_at_fpr(-ent, y, 0.05), "auroc": auroc(-ent, y)})  # fmt: skip
    names = list(dict.fromkeys(r["way"] for r in records))
    models = list(dict.fromkeys(r["model_id"] for r in records))

    def mean(metric, way, model=None):
        return float(np.mean([r[metric] for r in records if r["way"] == way and model in (None, r["model_id"])]))

    lines = [f"# Text superimposition for STRIP's statistic: {Path(args.zoo).name}", "",
             f"k = {args.k} overlays, {args.copies} copies, {args.seeds} support draws, {args.n_query} + {args.n_query} "
             "query inputs; TPR@5%FPR / AUROC of minus the mean per-copy entropy (mean over draws).", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for m in models:
        cells = [f"{mean('tpr@5fpr', w, m):.2f} / {mean('auroc', w, m):.2f}" for w in names]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | " + " | ".join(f"**{mean('tpr@5fpr', w):.2f} / {mean('auroc', w):.2f}**" for w in names) + " |"
    )
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "records": records}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
