"""Scan every model of a zoo as the scan benchmark does, and append one record per model to a JSONL file.

Each model gets [`scan_model`] on its first 20 clean probe inputs, seed 0, with the given budgets, and optionally
[`neural_cleanse_scan`] at each ``--nc_steps`` budget right after it, in the same process. Records
([`scan_record`]) carry the zoo row, its split (from ``--split``, a meta-training split file; default ``test``) and
the scan's signals and per-class evidence, so that heads are fit and scored later without a rescan
(``fit_head.py``, ``evaluate.py``). Resumable: a rerun skips the models already in ``--out``. ``--shard I/N`` scans
every N-th model from the I-th into ``OUT.shardIofN.jsonl``: run N side by side, then once without it to merge.

    python benchmarks/scan/scan_zoo.py --zoo artifacts/zoo/fresh_cv_3 --out benchmarks/scan/results/records/fresh_cv_3_blend.jsonl --nc_steps 120
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.scan import ScanConfig, neural_cleanse_scan, scan_model, scan_record
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

N_CLEAN, SEED = 20, 0
ROW_COLUMNS = ["model_id", "domain", "dataset", "architecture", "attack", "target_label", "is_backdoored"]


@dataclass
class ScanZooArguments:
    zoo: str = field(metadata={"help": "The zoo folder (metashield zoo build --out)."})
    out: str = field(metadata={"help": "The records' JSONL file (appended to)."})
    split: str | None = field(default=None, metadata={"help": "A split JSON ({'train': [...], 'test': [...]})."})
    head_train: str | None = field(
        default=None, metadata={"help": "File of model ids (one per line) the split does not list that train heads."}
    )
    steps: int = field(default=ScanConfig.steps, metadata={"help": "Mask synthesis steps (ScanConfig.steps)."})
    blend_steps: int | None = field(default=None, metadata={"help": "ScanConfig.blend_steps (None: the default)."})
    source_steps: int = field(default=0, metadata={"help": "ScanConfig.source_steps (0: none)."})
    feature_steps: int = field(default=0, metadata={"help": "ScanConfig.feature_steps (0: none)."})
    domains: list[str] = field(default_factory=list, metadata={"help": "Scan only these domains (cv, fl, nlp)."})
    nc_steps: list[int] = field(default_factory=list, metadata={"help": "Neural Cleanse budgets to run beside it."})
    shard: str | None = field(default=None, metadata={"help": "I/N: scan every N-th model from the I-th."})
    workdir: str = field(default="artifacts/scan_work", metadata={"help": "Where checkpoints are unpacked."})


def read_done(out: Path) -> dict[str, dict]:
    """The records already in ``out`` and its shard files, by model id."""
    done: dict[str, dict] = {}
    for path in [out, *sorted(out.parent.glob(f"{out.stem}.shard*.jsonl"))]:
        for line in path.read_text().splitlines() if path.exists() else []:
            if line.strip():
                rec = json.loads(line)
                done[rec["model_id"]] = rec
    return done


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(ScanZooArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = ScanConfig(
        steps=args.steps,
        blend_steps=args.blend_steps,
        source_steps=args.source_steps,
        feature_steps=args.feature_steps,
        seed=SEED,
    )
    split_of: dict[str, str] = {}
    if args.split:
        split = json.loads(Path(args.split).read_text())
        split_of = {m: s for s in ("train", "test") for m in split[s]}
    if args.head_train:
        lines = Path(args.head_train).read_text().splitlines()
        split_of |= {t.strip(): "train" for t in lines if t.strip() and not t.lstrip().startswith("#")}
    zoo = load_zoo(args.zoo)
    ids = zoo["model_id"]
    domains = zoo["domain"]
    order = [i for i in range(len(ids)) if not args.domains or domains[i] in args.domains]
    target_file = out
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        if not 0 <= i < n:
            raise SystemExit(f"--shard {args.shard}: need 0 <= I < N")
        order, target_file = order[i::n], out.with_name(f"{out.stem}.shard{i}of{n}.jsonl")
    done = read_done(out)
    workdir = Path(args.workdir)
    with target_file.open("a") as fh:
        for i in tqdm([i for i in order if ids[i] not in done], desc="scan", file=sys.stdout, mininterval=5):
            row = zoo[i]
            target = row_to_target(row, workdir)
            clean = row_probe(row)[0][:N_CLEAN]
            report = scan_model(target, clean, config=config)
            rec = scan_record(report, **{k: row[k] for k in ROW_COLUMNS}, split=split_of.get(row["model_id"], "test"))
            if args.nc_steps:
                rec["neural_cleanse"] = {}
                for s in args.nc_steps:
                    nc = neural_cleanse_scan(target, clean, steps=s, seed=SEED)
                    rec["neural_cleanse"][str(s)] = {
                        "score": nc.score,
                        "suspected_target": nc.suspected_target,
                        "seconds": nc.timings["total_s"],
                        "timings": nc.timings,
                        "steps": s,
                    }
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[rec["model_id"]] = rec
            shutil.rmtree(workdir / row["model_id"], ignore_errors=True)
    if not args.shard:  # merge the shards' records into OUT in zoo order
        shards = sorted(out.parent.glob(f"{out.stem}.shard*.jsonl"))
        if shards:
            out.write_text("".join(json.dumps(done[m]) + "\n" for m in ids if m in done))
            for path in shards:
                path.unlink()
    print(f"{sum(ids[i] in done for i in order)} of {len(order)} models scanned -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
