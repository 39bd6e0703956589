"""How many trigger-synthesis steps does a scan need? Writes ``reports/scan_budget.md`` + ``reports/scan_budget.json``.

On the *train* models of the meta-training split (the held-out ones play no part in choosing the budget), one
synthesis of ``--steps`` (120, Neural Cleanse's budget in ``reports/scan.md``) runs per model, keeping snapshots of
what shorter budgets would have returned (``synthesize_triggers(snapshots=...)``, the same trajectory cut short). For
each budget it reports:

- how far the trigger sizes are from the full budget's: the ratio ``size(b) / size(full)`` of every target class
  of a backdoored model (the class the scan must single out) and of every other class;
- the scan signals at that budget, scored by a fixed head (default: the shipped one): how often the verdict and
  the suspected target agree with the full budget's, and the mean change of the score;
- the AUROC of a head fit on that budget's signals, cross-validated over the train models (``cv_head_c`` of
  ``scan_benchmark.py``), and the target accuracy.

Per-model records are appended to ``OUT.jsonl`` (a rerun skips the models there); ``--shard I/N`` runs every N-th
model into ``OUT.shardIofN.jsonl``; a run without ``--shard`` merges them and writes the report.

Usage:

    python scripts/scan_budget.py --zoo artifacts/zoo/standard --split artifacts/meta/maml/split.json \\
        --out reports/scan_budget
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan_benchmark import N_CLEAN, SEED, cv_head_c, load_records, merge_shards, records_path, shard_of  # noqa: E402

from metashield_hf.scan import _detector_scores, _synthesize, scan_model, scan_signals  # noqa: E402
from metashield_hf.scan_head import ScanHead  # noqa: E402
from metashield_hf.synthesis import anomaly_indices  # noqa: E402
from metashield_hf.targets import load_target  # noqa: E402
from metashield_hf.zoo import load_zoo, row_probe, row_to_target  # noqa: E402

BUDGETS = (40, 60, 80, 100)
SCAN_SETTINGS = {
    k: inspect.signature(scan_model).parameters[k].default for k in ("lr", "flip_threshold", "class_batch")
}


def _signals(adapter, clean_out, result) -> dict:
    (det,) = _detector_scores(
        None, adapter, clean_out, [(result.logits, result.penultimate)], adapt_steps=None, seed=SEED
    )
    target, signals = scan_signals(result.sizes, anomaly_indices(result.sizes), det)
    return {"sizes": result.sizes.tolist(), "target": target, "signals": signals}


def budget_row(row: dict, workdir: Path, steps: int, budgets: list[int]) -> dict:
    """One full synthesis of a zoo model with snapshots at ``budgets``; the signals at each budget."""
    adapter = load_target(row_to_target(row, workdir))
    items = list(adapter.iter_items(row_probe(row)[0][:N_CLEAN]))[:N_CLEAN]
    # the scan's own synthesis, with scan_model's settings: only the budget differs
    clean_out, result, _ = _synthesize(adapter, items, steps=steps, snapshots=budgets, seed=SEED, **SCAN_SETTINGS)
    shutil.rmtree(workdir / row["model_id"], ignore_errors=True)
    runs = {**result.snapshots, steps: result}
    return {
        "model_id": row["model_id"],
        "domain": row["domain"],
        "is_backdoored": bool(row["is_backdoored"]),
        "target_label": int(row["target_label"]),
        "num_classes": len(result.sizes),
        "budgets": {str(b): _signals(adapter, clean_out, runs[b]) for b in sorted(runs)},
    }


def report(records: list[dict], head: ScanHead, head_name: str, steps: int, command: str) -> tuple[dict, str]:
    budgets = sorted({int(b) for r in records for b in r["budgets"]})
    full = str(steps)
    rows = {}
    for b in budgets:
        key = str(b)
        tgt_ratio, other_ratio, agree, same_target, dscore, hits, train = [], [], [], [], [], [], []
        for r in records:
            now, ref = r["budgets"][key], r["budgets"][full]
            ratio = np.array(now["sizes"]) / np.array(ref["sizes"])
            for k, x in enumerate(ratio):
                (tgt_ratio if r["is_backdoored"] and k == r["target_label"] else other_ratio).append(float(x))
            p_now, p_ref = head.score(now["signals"]), head.score(ref["signals"])
            agree.append((p_now > head.threshold) == (p_ref > head.threshold))
            same_target.append(now["target"] == ref["target"])
            dscore.append(abs(p_now - p_ref))
            if r["is_backdoored"]:
                hits.append(now["target"] == r["target_label"])
            train.append({**r, "modality": "image", "metashield": {"signals": now["signals"]}})
        cv = cv_head_c(train, (), cs=(0.1,), repeats=10)[0.1]
        rows[key] = {
            "cost": b / steps,
            "target_size_ratio": {q: float(np.quantile(tgt_ratio, v)) for q, v in (("median", 0.5), ("p90", 0.9))}
            | {"max": float(np.max(tgt_ratio))},
            "other_size_ratio": {q: float(np.quantile(other_ratio, v)) for q, v in (("median", 0.5), ("p90", 0.9))}
            | {"max": float(np.max(other_ratio))},
            "verdict_agreement": float(np.mean(agree)),
            "target_agreement": float(np.mean(same_target)),
            "mean_abs_score_change": float(np.mean(dscore)),
            "cv_auroc": cv,
            "target_accuracy": float(np.mean(hits)),
        }
    domains = sorted({r["domain"] for r in records})
    counts = ", ".join(
        f"{d} {sum(r['domain'] == d for r in records)} ({sum(r['domain'] == d and r['is_backdoored'] for r in records)}"
        " bd)"
        for d in domains
    )
    lines = [
        "# Synthesis budget: how many steps a scan needs",
        "",
        "Written by `scripts/scan_budget.py` from one run on this machine; nothing here is hand-typed. Reproduce:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"- models: the train models of the meta-training split only ({counts}); the held-out models play no part",
        f"- one {steps}-step synthesis per model (20 clean probe inputs, seed 0), with snapshots of the shorter budgets"
        " (the same trajectory cut short, so the columns differ by the budget alone)",
        f"- fixed head for the agreement columns: {head_name} ({head.source})",
        "",
        "Columns: size ratio = trigger size at the budget / at the full budget (median, 90th percentile, max), for the"
        " target class of every backdoored model and for every other class; agreement = the fixed head's verdict"
        " (suspected target) at the budget equals the one at the full budget; |Δ score| = mean change of that head's"
        " score; CV AUROC = a head fit on that budget's signals, 5-fold cross-validated over the train models (10"
        " repeats, C = 0.1); target acc. = suspected target = the attack's target, backdoored models.",
        "",
        "| steps | cost | target size ratio (med / p90 / max) | other classes (med / p90 / max) | verdict agr. "
        "| target agr. | mean abs. score change | CV AUROC | target acc. |",
        "|---:|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for key, v in rows.items():
        t, o = v["target_size_ratio"], v["other_size_ratio"]
        cv = ", ".join(f"{d} {a:.3f}" for d, a in v["cv_auroc"].items())
        lines.append(
            f"| {key} | {v['cost']:.2f} | {t['median']:.2f} / {t['p90']:.2f} / {t['max']:.2f} "
            f"| {o['median']:.2f} / {o['p90']:.2f} / {o['max']:.2f} | {v['verdict_agreement']:.3f} "
            f"| {v['target_agreement']:.3f} | {v['mean_abs_score_change']:.3f} | {cv} | {v['target_accuracy']:.3f} |"
        )
    return {"steps": steps, "models": len(records), "budgets": rows}, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="artifacts/zoo/standard")
    parser.add_argument("--split", default="artifacts/meta/maml/split.json")
    parser.add_argument("--steps", type=int, default=120, help="the full budget the shorter ones are compared with")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--domains", nargs="+", default=["cv", "fl"], help="zoo domains (image models)")
    parser.add_argument("--head", default=None, help="JSON of the fixed head (default: the shipped one)")
    parser.add_argument("--out", default="reports/scan_budget")
    parser.add_argument("--workdir", default="artifacts/meta/budget_work")
    parser.add_argument("--shard", default=None, help="I/N: run only every N-th model from the I-th; no report")
    parser.add_argument("--report_only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shard = shard_of(args.shard)
    jsonl = records_path(out, shard)
    done = load_records(out)
    train = set(json.loads(Path(args.split).read_text())["train"])
    zoo = load_zoo(args.zoo)
    order = [i for i, m in enumerate(zoo["model_id"]) if m in train and zoo[i]["domain"] in args.domains]
    if shard:
        order = order[shard[0] :: shard[1]]
    todo = [] if args.report_only else [i for i in order if zoo[i]["model_id"] not in done]
    workdir = Path(args.workdir + (str(shard[0]) if shard else ""))
    with jsonl.open("a") as fh:
        for i in tqdm(todo, desc="budget", file=sys.stdout, mininterval=5):
            rec = budget_row(zoo[i], workdir, args.steps, args.budgets)
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[rec["model_id"]] = rec
    if shard:
        return
    merge_shards(out, done, sorted(done))
    records = [done[m] for m in sorted(done)]
    command = "python " + " ".join(["scripts/scan_budget.py", *sys.argv[1:]]).replace(" --report_only", "")
    summary, md = report(records, ScanHead.load(args.head), args.head or "the shipped one", args.steps, command)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
