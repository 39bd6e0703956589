"""Add the dormant shortcut weights ([`dormant_mass`], [`dormant_signals`]) to scan records made before the scan
computed them, from the zoo's own models and the same 20 clean probe inputs [`scan_model`] reads, so that a head can
be refit on them without rescanning (the values are the ones a default scan gives: one clean forward pass, no
randomness).

    python benchmarks/scan/record_dormancy.py --zoo artifacts/zoo/unseen_cv_2 \
        --records benchmarks/scan/results/records/unseen_cv_2.jsonl

Records that already carry the signals are left as they are; the file is rewritten in place.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.scan import DORMANT_SIGNALS, dormant_mass, dormant_signals
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

N_CLEAN = 20  # scan_zoo.py's clean samples per scan


@dataclass
class Args:
    zoo: str = field(metadata={"help": "The zoo folder the records were scanned from."})
    records: str = field(metadata={"help": "The JSONL records to complete (rewritten in place)."})
    workdir: str = field(default="artifacts/scan_work", metadata={"help": "Where checkpoints are unpacked."})


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    path = Path(args.records)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    zoo = load_zoo(args.zoo)
    index = {mid: i for i, mid in enumerate(zoo["model_id"])}
    missing = [r["model_id"] for r in records if r["model_id"] not in index]
    if missing:
        raise SystemExit(f"{len(missing)} records are not in {args.zoo}, e.g. {missing[0]}")
    todo = [r for r in records if not all(s in r["metashield"]["signals"] for s in DORMANT_SIGNALS)]
    for rec in tqdm(todo, desc="dormancy", file=sys.stdout, mininterval=5):
        row = zoo[index[rec["model_id"]]]
        target = row_to_target(row, args.workdir)
        with torch.no_grad():
            out = target(row_probe(row)[0][:N_CLEAN])
        mass = dormant_mass(target.head.weight, out.penultimate)
        rec["metashield"]["signals"] |= dormant_signals(mass)
        rec["metashield"]["dormancy"] = True
        rec["metashield"].setdefault("per_class", {})["dormant_mass"] = [float(m) for m in mass]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{path}: {len(todo)} of {len(records)} records completed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
