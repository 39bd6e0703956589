"""Held-out evaluation of meta-trained detectors on the zoo (issue [3/6]); writes ``reports/meta.md`` + ``.json``.

Every variant sees exactly the same episodes: per held-out model, per support size k and per seed, the same k clean
probe inputs are the support, and the other clean inputs and the triggered inputs are scored. Reads the activation
cache and the split that ``metashield train`` wrote, so nothing is recomputed through the target models.

    python scripts/meta_benchmark.py --cache_dir artifacts/meta/cache --split artifacts/meta/maml/split.json \\
        --variant "MAML + adaptation=artifacts/meta/maml/detector:3" \\
        --variant "MAML, no adaptation=artifacts/meta/maml/detector:0" \\
        --variant "pooled (no meta-learning)=artifacts/meta/pooled/detector:0" \\
        --variant "oracle inner loop=artifacts/meta/oracle/detector:3:oracle" \\
        --k 10,20 --seeds 2 --out reports/meta

A variant is ``NAME=DETECTOR_DIR:STEPS[:oracle]`` (``STEPS`` inner-loop steps at adaptation; ``oracle`` shows the
true trigger to the inner loop — an ablation, deployment never has it). ``--shard i/n`` evaluates every n-th record
so that two processes can share the work; ``--merge`` joins the shards' JSON and writes the report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from metashield_hf import MetaShieldDetector
from metashield_hf.meta.cache import cache_path, load_tasks
from metashield_hf.meta.evaluate import evaluate_task, render_variants


def parse_variant(text: str) -> tuple[str, str, int, bool]:
    name, spec = text.split("=", 1)
    parts = spec.split(":")
    return name, parts[0], int(parts[1]) if len(parts) > 1 else 0, len(parts) > 2 and parts[2] == "oracle"


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    test_ids = json.loads(Path(args.split).read_text())["test"]
    test_ids = [i for i in test_ids if cache_path(args.cache_dir, i).exists()]
    tasks = load_tasks(args.cache_dir, test_ids)
    variants = [parse_variant(v) for v in args.variant]
    detectors = {d: MetaShieldDetector.from_pretrained(d) for _, d, _, _ in variants}
    jobs = [
        (v, t, k, s) for v in variants for t in tasks for k in args.k for s in range(args.seeds)
    ]  # same (task, k, seed) = same support and query for every variant
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--split", required=True, help="split.json of the training run (its 'test' models are used)")
    parser.add_argument("--variant", action="append", default=[], help="NAME=DETECTOR_DIR:STEPS[:oracle]")
    parser.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--merge", nargs="*", help="shard JSON files to join (no evaluation is run)")
    parser.add_argument("--meta", default="{}", help="JSON of extra facts to list at the top of the report")
    parser.add_argument("--out", default="reports/meta", help="writes OUT.json (records) and OUT.md (report)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        records = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        out.with_suffix(".json").write_text(json.dumps(records, indent=1))
        out.with_suffix(".md").write_text(render_variants(records, json.loads(args.meta)))
        print(out.with_suffix(".md").read_text())
        return
    start = time.perf_counter()
    records = run(args)
    Path(f"{out}.shard{args.shard.replace('/', 'of')}.json").write_text(json.dumps(records, indent=1))
    print(
        f"{len(records)} records in {time.perf_counter() - start:.0f} s; mean {np.mean([r['seconds'] for r in records]):.2f} s"
    )


if __name__ == "__main__":
    main()
