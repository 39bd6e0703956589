"""Held-out evaluation of meta-trained detectors on the zoo: writes ``results/held_out.md`` + ``.json``.

Every variant sees exactly the same episodes: per held-out model, per support size k and per seed, the same k clean
probe inputs are the support, and the other clean inputs and the triggered inputs are scored. Reads the activation
cache and the split that ``metashield train`` wrote, so nothing is recomputed through the target models.

    python benchmarks/meta/held_out.py --cache_dir artifacts/meta/cache --split artifacts/meta/maml/split.json \\
        --variant "MAML + adaptation=artifacts/meta/maml/detector:3" \\
                  "MAML, no adaptation=artifacts/meta/maml/detector:0" \\
                  "pooled (no meta-learning)=artifacts/meta/pooled/detector:0" \\
                  "oracle inner loop=artifacts/meta/oracle/detector:3:oracle" \\
        --k 10,20 --seeds 2 --out artifacts/meta/held_out

A variant is ``NAME=DETECTOR_DIR:STEPS[:oracle]`` (``STEPS`` inner-loop steps at adaptation; ``oracle`` shows the
true trigger to the inner loop — an ablation, deployment never has it). ``--shard i/n`` evaluates every n-th record
so that two processes can share the work; ``--merge`` joins the shards' JSON and writes the report (no cache or
detector is read then, so ``--merge benchmarks/meta/results/held_out.json`` re-renders the committed table).
``bash benchmarks/meta/run.sh`` runs the whole study.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from metashield_hf import MetaShieldDetector
from metashield_hf.evaluation.held_out import evaluate_task, render_variants
from metashield_hf.meta.cache import cache_path, load_tasks


@dataclass
class HeldOutArguments:
    """Flags of ``benchmarks/meta/held_out.py``."""

    cache_dir: str | None = field(default=None, metadata={"help": "Activation cache of `metashield train`."})
    split: str | None = field(
        default=None, metadata={"help": "split.json of the training run (its 'test' models are evaluated)."}
    )
    variant: list[str] = field(
        default_factory=list, metadata={"help": "NAME=DETECTOR_DIR:STEPS[:oracle], one or more."}
    )
    k: str = field(default="10,20", metadata={"help": "Support sizes (clean samples), comma-separated."})
    seeds: int = field(default=2, metadata={"help": "Episode seeds per (model, k)."})
    shard: str = field(default="0/1", metadata={"help": "i/n: evaluate every n-th record, starting at the i-th."})
    merge: list[str] | None = field(
        default=None, metadata={"help": "Shard JSON files to join into OUT.json and OUT.md (no evaluation is run)."}
    )
    meta: str = field(default="{}", metadata={"help": "JSON of extra facts listed at the top of the report."})
    out: str = field(
        default="benchmarks/meta/results/held_out", metadata={"help": "Writes OUT.json (records) and OUT.md (report)."}
    )


def parse_variant(text: str) -> tuple[str, str, int, bool]:
    """``NAME=DETECTOR_DIR:STEPS[:oracle]`` -> (name, detector folder, inner steps, oracle)."""
    name, spec = text.split("=", 1)
    parts = spec.split(":")
    return name, parts[0], int(parts[1]) if len(parts) > 1 else 0, len(parts) > 2 and parts[2] == "oracle"


def evaluate_shard(args: HeldOutArguments) -> list[dict]:
    """Evaluate this shard's (variant, model, k, seed) episodes; one record each."""
    if args.cache_dir is None or args.split is None or not args.variant:
        raise ValueError("--cache_dir, --split and --variant are required unless --merge is given")
    torch.set_num_threads(1)
    test_ids = json.loads(Path(args.split).read_text())["test"]
    test_ids = [i for i in test_ids if cache_path(args.cache_dir, i).exists()]
    tasks = load_tasks(args.cache_dir, test_ids)
    variants = [parse_variant(v) for v in args.variant]
    detectors = {d: MetaShieldDetector.from_pretrained(d) for _, d, _, _ in variants}
    ks = [int(x) for x in args.k.split(",")]
    # the same (task, k, seed) gives the same support and query for every variant
    jobs = [(v, t, k, s) for v in variants for t in tasks for k in ks for s in range(args.seeds)]
    index, count = (int(x) for x in args.shard.split("/"))
    records = []
    for j, ((name, det_dir, steps, oracle), task, k, seed) in enumerate(jobs):
        if j % count != index:
            continue
        t0 = time.perf_counter()
        rec = evaluate_task(detectors[det_dir], task, k=k, steps=steps, seed=seed, oracle=oracle)
        rec.update(variant=name, seconds=time.perf_counter() - t0)
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(HeldOutArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        records = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        out.with_suffix(".json").write_text(json.dumps(records, indent=1))
        out.with_suffix(".md").write_text(render_variants(records, json.loads(args.meta)))
        print(out.with_suffix(".md").read_text())
        return 0
    start = time.perf_counter()
    records = evaluate_shard(args)
    Path(f"{out}.shard{args.shard.replace('/', 'of')}.json").write_text(json.dumps(records, indent=1))
    seconds = np.mean([r["seconds"] for r in records])
    print(f"{len(records)} records in {time.perf_counter() - start:.0f} s; mean {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
