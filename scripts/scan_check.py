"""Check a scan head on a second zoo: models that no choice of signals, C or head was made on.

``scripts/scan_benchmark.py`` fits and chooses the scan head on the standard zoo's train models and reports the held
out ones; but a choice revisited after looking at held-out results is no longer blind to them. This script scans
every model of another zoo (built with another seed, e.g. ``configs/zoo/fresh_minilm.yaml``) as the benchmark does
(first 20 clean probe inputs, seed 0, ``scan_model`` defaults) and scores them with a given head (default: the shipped
one), per group, with each text signal's own AUROC beside it. No Neural Cleanse unless ``--nc_steps`` is given.

Usage (``--shard I/N`` as in the benchmark: N side by side, then once without it to write the report):

    python scripts/scan_check.py --zoo artifacts/zoo/fresh_minilm --out reports/scan_fresh_minilm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scan_benchmark import (
    DEFAULT_STEPS,
    NEURAL_CLEANSE_THRESHOLD,
    _total_s,
    groups,
    load_records,
    load_reuse_nc,
    merge_shards,
    records_path,
    refresh,
    scan_row,
    score,
    shard_of,
    signals_alone,
    summarize,
    table_rows,
)
from tqdm.auto import tqdm

from metashield_hf.scan_head import DEFAULT_SCAN_HEAD, ScanHead
from metashield_hf.zoo import load_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True)
    parser.add_argument(
        "--head",
        nargs="+",
        default=[str(DEFAULT_SCAN_HEAD)],
        help="scan head JSONs to compare (default: the shipped one)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--nc_steps", type=int, nargs="*", default=[], help="Neural Cleanse budgets (default: none)")
    parser.add_argument(
        "--blend_steps",
        type=int,
        default=None,
        help="scan_model's blend synthesis budget (default: scan_model's, 20 for image models; 0: none)",
    )
    parser.add_argument(
        "--source_steps", type=int, default=0, help="scan_model's opt-in source-specific synthesis budget (default: 0)"
    )
    parser.add_argument(
        "--reuse_nc",
        default=None,
        help="JSONL of an earlier scan of the same models whose Neural Cleanse records are reused, not rerun",
    )
    parser.add_argument("--out", required=True, help="writes OUT.jsonl (records) and OUT.md")
    parser.add_argument("--workdir", default="artifacts/meta/scan_check_work")
    parser.add_argument("--shard", default=None, help="I/N: scan only every N-th model from the I-th; no report")
    parser.add_argument(
        "--held_out",
        default=None,
        help="the benchmark's records (reports/scan.jsonl): scan only the zoo's models held out there, e.g. to time "
        "the default scan beside Neural Cleanse on them (scan_benchmark.py --rescans)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    shard = shard_of(args.shard)
    zoo = load_zoo(args.zoo)
    ids = zoo["model_id"]
    done = load_records(out)
    reuse_nc = load_reuse_nc(Path(args.reuse_nc), DEFAULT_STEPS) if args.reuse_nc else None
    chosen = list(range(len(ids)))
    if args.held_out:
        held = {m for m, r in load_records(Path(args.held_out).with_suffix("")).items() if r["split"] == "test"}
        chosen = [i for i in chosen if ids[i] in held]
    share = chosen if shard is None else chosen[shard[0] :: shard[1]]
    start = time.perf_counter()
    with records_path(out, shard).open("a") as fh:
        for i in tqdm([i for i in share if ids[i] not in done], desc="scan", file=sys.stdout, mininterval=5):
            rec = scan_row(
                zoo[i],
                "test",
                Path(args.workdir),
                args.steps,
                args.nc_steps,
                reuse_nc,
                blend_steps=args.blend_steps,
                source_steps=args.source_steps,
            )
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[rec["model_id"]] = rec
    if shard is not None:
        print(f"shard {args.shard}: scanned in {time.perf_counter() - start:.0f} s")
        return
    merge_shards(out, done, ids)
    records = [done[ids[i]] for i in chosen if ids[i] in done]
    heads = {path: ScanHead.load(path) for path in args.head}
    for r in refresh(records):
        for i, head in enumerate(heads.values()):
            r["metashield"][f"score_head{i}"] = score(head, r)
    methods = {
        f"MetaShield scan, head {path}": (f"score_head{i}", head, "metashield")
        for i, (path, head) in enumerate(heads.items())
    }
    methods |= {
        f"Neural Cleanse ({s} steps)": ("score", NEURAL_CLEANSE_THRESHOLD, f"neural_cleanse@{s}")
        for s in args.nc_steps
    }
    lines = [
        f"# Scan check on {args.zoo}",
        "",
        f"Written by `scripts/scan_check.py`; reproduce: `python {' '.join(sys.argv)}`. {len(records)} models, "
        f"{sum(_total_s(r) for r in records):.0f} s of scans in all. Heads: "
        + "; ".join(f"{path} ({head.source})" for path, head in heads.items()),
        "",
        "| group | method | AUROC | accuracy | target accuracy | s / scan |",
        "|---|---|---:|---:|---:|---:|",
    ]
    table = {
        g: {name: summarize(rs, key, thr, m) for name, (key, thr, m) in methods.items()}
        for g, rs in groups(records).items()
    }
    lines += table_rows(table)
    text = [r for r in records if "token_prob" in r["metashield"]["signals"]]
    if 0 < sum(int(r["is_backdoored"]) for r in text) < len(text):
        lines += ["", f"Each token signal alone, AUROC over the {len(text)} text models: {signals_alone(text)}"]
    lines += [
        "",
        "Per model (score: the first head's; detector: the input-level detector's mean score on the samples with each "
        "class's trigger: for text its token trigger, which `token_detector` weighs by the share of samples the trigger "
        "flips; for images the synthesized one, which has no text to show):",
        "",
        "| model | backdoored | target | suspected | score | trigger of the suspected target | detector per class |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in records:
        ms = r["metashield"]
        t = ms["suspected_target"]
        trig = ms["tokens"][t]["trigger"] if ms.get("tokens") else ""
        lines.append(
            f"| {r['model_id']} | {r['is_backdoored']} | {r['target_label']} | {t} | {ms['score_head0']:.3f} | "
            f"{trig!r} | {' / '.join(f'{d:.2f}' for d in ms['per_class']['detector_score'])} |"
        )
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
