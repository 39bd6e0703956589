"""A first look at issue [3/5]: the inner loop's positives from the scan's trigger synthesis instead of pseudo-anomalies.

For the first ``--models`` backdoored image / FL models of ``--zoo`` and ``--seeds`` episodes each (k = ``--k`` clean
support inputs, 32 clean + 32 triggered query inputs, `meta.episodes.draw_rows`), the shipped one-pass detector is
adapted three ways and scored on the same query:

- ``pseudo``: today's inner loop (pseudo-anomalies in ψ space);
- ``synthesized``: the target's outputs on the support with the synthesized trigger of the class whose trigger is the
  most anomalous (`metashield_hf.scan.scanner.run_synthesis`, ``--steps`` steps) as the inner loop's positives;
- ``oracle``: 20 truly triggered inputs (not in the query) as the positives (deployment never has them).

The detector was meta-trained with pseudo-anomalies, so this measures what synthesis adds without meta-training as
deployed. Writes ``--out`` ``.md`` / ``.json``.

    python benchmarks/input_detection/synthesized_positives.py --zoo artifacts/zoo/live_dev \
        --out benchmarks/input_detection/results/synthesized_positives/live_dev_first_look
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import tpr_at_fpr
from metashield_hf.loading import load_detector
from metashield_hf.meta.episodes import draw_rows
from metashield_hf.scan.scanner import run_synthesis
from metashield_hf.shield import adapt_from_activations
from metashield_hf.targets.base import TargetOutput
from metashield_hf.zoo import load_zoo, row_probe, row_to_target


@dataclass
class SynthesizedPositivesArguments:
    zoo: str = field(metadata={"help": "Zoo folder."})
    out: str = field(metadata={"help": "Results path without suffix."})
    models: int = field(default=8, metadata={"help": "Backdoored image / FL models scored (in zoo order)."})
    seeds: int = field(default=2, metadata={"help": "Episodes per model."})
    k: int = field(default=20, metadata={"help": "Clean support inputs."})
    steps: int = field(default=40, metadata={"help": "Steps of the trigger synthesis."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(SynthesizedPositivesArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    det = load_detector(one_pass=True)
    zoo = load_zoo(args.zoo)
    meta = zoo.select_columns(["model_id", "domain", "is_backdoored"]).to_list()
    rows = [i for i, m in enumerate(meta) if m["is_backdoored"] and m["domain"] != "nlp"][: args.models]
    records = []
    for i in rows:
        row = zoo[i]
        adapter = row_to_target(row, batch_size=256)
        clean, triggered, _ = row_probe(row)
        w = adapter.head.weight.detach().float()
        b = None if adapter.head.bias is None else adapter.head.bias.detach().float()
        for seed in range(args.seeds):
            support, clean_q, pool = draw_rows(len(clean), len(triggered), args.k, seed, 32)
            items_s = adapter.prepare_items([clean[j] for j in support.tolist()])
            query = [clean[j] for j in clean_q.tolist()] + [triggered[j] for j in pool[:32].tolist()]
            with torch.no_grad():
                out_s, out_q = adapter(items_s), adapter(adapter.prepare_items(query))
                oracle = adapter(adapter.prepare_items([triggered[j] for j in pool[32:52].tolist()]))
            _, result, anomaly = run_synthesis(adapter, items_s, steps=args.steps, lr=0.3, flip_threshold=0.9,
                                               class_batch=16, seed=seed, clean_out=out_s)  # fmt: skip
            c = int(np.argmax(anomaly))
            synthesized = TargetOutput(result.logits[c], result.penultimate[c])
            y = np.r_[np.zeros(len(clean_q)), np.ones(len(query) - len(clean_q))]
            rec = {"model_id": row["model_id"], "seed": seed, "synthesized_class": c}
            for name, positives in (("pseudo", None), ("synthesized", synthesized), ("oracle", oracle)):
                shield = adapt_from_activations(det, out_s, w, b, steps=det.config.adapt_steps, lr=det.config.adapt_lr,
                                                seed=seed, anomaly_out=positives)  # fmt: skip
                s = shield.score_features(shield.features_of(out_q)[1]).numpy()
                rec[name] = tpr_at_fpr(s, y, 0.05)
            records.append(rec)
            print(rec, flush=True)
    names = ("pseudo", "synthesized", "oracle")
    mean = {n: float(np.mean([r[n] for r in records])) for n in names}
    text = (f"# Inner-loop positives, first look: {Path(args.zoo).name}\n\n{len(rows)} backdoored image / FL models x "
            f"{args.seeds} episodes, k = {args.k}, shipped one-pass detector; TPR@5%FPR (mean over episodes)\n\n"
            "| positives | TPR@5%FPR |\n|---|---:|\n" + "".join(f"| {n} | {mean[n]:.3f} |\n" for n in names))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "mean": mean, "records": records}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
