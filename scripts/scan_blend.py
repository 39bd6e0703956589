"""The scan head's ``image/blend`` and ``image/source`` parts: chosen on train image models scanned with the blend
synthesis (scan_model's default) or the opt-in source-specific synthesis, then checked on held-out and fresh ones.

``scan_model(blend_steps=N)`` also synthesizes, per class, the smallest whole-image blend ``(1 - a) * x + a * p``
(``synthesize_triggers(uniform_mask=True)``); its signals ([`BLEND_SIGNALS`]) join the four synthesis signals in a
head part of their own. This script

1. reads ``scripts/scan_check.py`` records of image zoos scanned with ``--blend_steps``: the standard zoo's image models
   (``configs/zoo/standard_cv.yaml`` and ``standard_fl.yaml`` rebuild the very models of the standard zoo), whose
   split comes from the benchmark's records (``--split_records``), and other zoos' (``--extra_train``: train rows;
   ``--check``: checked only);
2. checks that the rescans reproduce the benchmark's synthesis signals (the same models, the same seeds);
3. chooses the part's signals and C among a fixed list by repeated stratified 5-fold cross-validation on the train
   rows only, fits it on them, sets its verdict threshold where that cross-validation flags 5% of the train clean
   models (``--target_fpr``), and
4. reports, per held-out or check group, the shipped head without the part, with it, and Neural Cleanse where the
   records have it; ``--ship`` adds the part to the shipped head.

``--part source`` does the same for the ``image/source`` part (``scan_model(source_steps=N)``, a mask that flips the
easiest half of the samples, [`SOURCE_SIGNALS`]) on records scanned with ``--source_steps``; its candidates add the
source signals to the four synthesis signals and the blend signals, which every such scan also has.

Usage (after the scans, see reports/scan_blend.md and reports/scan_source.md for the commands):

    python scripts/scan_blend.py --standard reports/scan_blend_standard_cv.jsonl \\
        --extra_train reports/scan_fresh_cv_blend.jsonl \\
        --check reports/scan_fresh_cv_2_blend.jsonl reports/scan_unseen_cv.jsonl --out reports/scan_blend
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scan_benchmark import (
    BLEND,
    N_CLEAN,
    NEURAL_CLEANSE_THRESHOLD,
    SEED,
    SYNTHESIS_SIGNALS,
    fpr_threshold,
    load_records,
    refresh,
    score,
    summarize,
    table_rows,
    variant,
)
from sklearn.model_selection import StratifiedKFold

from metashield_hf.evaluation.metrics import auroc
from metashield_hf.scan_head import (
    BLEND_SIGNALS,
    DEFAULT_SCAN_HEAD,
    SOURCE,
    SOURCE_SIGNALS,
    ScanHead,
    fit_scan_head,
)


class Part(NamedTuple):
    """A head part for the scans of one variant: the signals every candidate has (``base``), those the variant adds
    (``extra``), the scan option that runs it, its stage in ``timings`` and the signal the per-model table shows."""

    base: tuple[str, ...]
    extra: tuple[str, ...]
    option: str
    timing: str
    shown: str

    def candidates(self) -> list[tuple[str, ...]]:
        """The base with all the variant's signals, or with each one alone."""
        return [self.base + self.extra] + [self.base + (s,) for s in self.extra]


# fixed before any scan of each variant existed (blend: stop 24; source: stop 25, logs/note25_plan.md), at three
# strengths of the L2 penalty
PARTS = {
    BLEND: Part(SYNTHESIS_SIGNALS, BLEND_SIGNALS, "--blend_steps", "blend_s", "blend_anomaly_excess"),
    SOURCE: Part(SYNTHESIS_SIGNALS + BLEND_SIGNALS, SOURCE_SIGNALS, "--source_steps", "source_s", "source_log_size_z"),
}
CS = (0.1, 1.0, 10.0)


def part_records(path: str, name: str = BLEND) -> list[dict]:
    """The records of ``path``, refreshed; every one must be a scan of variant ``name``."""
    records = refresh(list(load_records(Path(path).with_suffix("")).values()))
    missing = [r["model_id"] for r in records if variant(r) != name]
    if missing:
        raise SystemExit(
            f"{path}: {len(missing)} records were scanned without {PARTS[name].option}, e.g. {missing[0]}"
        )
    return records


def cv_scores(rows: list[dict], signals: tuple[str, ...], c: float, repeats: int = 20) -> list[np.ndarray]:
    """Per repeat, every row's score by a part fit on the other folds of a stratified 5-fold split (strata: label
    and dataset)."""
    y = np.array([int(r["is_backdoored"]) for r in rows])
    strata = [f"{r['dataset']}{y[i]}" for i, r in enumerate(rows)]
    x = [r["metashield"]["signals"] for r in rows]
    out = []
    for rep in range(repeats):
        scores = np.zeros(len(rows))
        for fit, held in StratifiedKFold(5, shuffle=True, random_state=rep).split(rows, strata):
            part = fit_scan_head([x[i] for i in fit], y[fit], c=c, signals=signals)
            scores[held] = [part.score(x[i]) for i in held]
        out.append(scores)
    return out


def mean_auroc(runs: list[np.ndarray], rows: list[dict]) -> float:
    """The mean over the repeats ``runs`` ([`cv_scores`]) of the rows' out-of-fold AUROC."""
    y = np.array([int(r["is_backdoored"]) for r in rows])
    return float(np.mean([auroc(scores, y) for scores in runs]))


def cv_auroc(rows: list[dict], signals: tuple[str, ...], c: float, repeats: int = 20) -> float:
    """Mean AUROC over ``repeats`` stratified 5-fold splits of a part fit on the rest ([`cv_scores`])."""
    return mean_auroc(cv_scores(rows, signals, c, repeats), rows)


def without_time(records: list[dict], stage: str) -> list[dict]:
    """Copies of ``records`` whose scan time leaves out one stage (what the scan without it costs)."""
    out = copy.deepcopy(records)
    for r in out:
        r["metashield"]["seconds"] -= r["metashield"]["timings"].get(stage, 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--standard",
        nargs="+",
        required=True,
        help="scan_check.py records of the standard zoo's image models (configs/zoo/standard_cv.yaml, standard_fl)",
    )
    parser.add_argument("--split_records", default="reports/scan.jsonl", help="the benchmark's records (splits)")
    parser.add_argument("--extra_train", nargs="*", default=[], help="other zoos' records that train the part")
    parser.add_argument(
        "--target_fpr",
        type=float,
        default=0.05,
        help="set the part's verdict threshold to flag this share of train clean models by cross-validation "
        "(default 0.05; 0: the probability 0.5)",
    )
    parser.add_argument("--check", nargs="*", default=[], help="other zoos' records, checked only")
    parser.add_argument("--out", default="reports/scan_blend", help="writes OUT.md, OUT.json and OUT.head.json")
    parser.add_argument("--ship", action="store_true", help="add the chosen part to the shipped scan head")
    parser.add_argument("--part", choices=list(PARTS), default=BLEND, help="the head part to choose (default: blend)")
    args = parser.parse_args()
    if not 0.0 <= args.target_fpr < 1.0:
        parser.error(f"--target_fpr must be in [0, 1), got {args.target_fpr}")
    spec, key = PARTS[args.part], f"image/{args.part}"

    benchmark = {
        r["model_id"]: r for r in refresh(list(load_records(Path(args.split_records).with_suffix("")).values()))
    }
    standard = [r for path in args.standard for r in part_records(path, args.part) if r["model_id"] in benchmark]
    # the rescans are of the same models with the same seeds: their synthesis signals must match the benchmark's
    drift = max(
        abs(r["metashield"]["signals"][s] - benchmark[r["model_id"]]["metashield"]["signals"][s])
        for r in standard
        for s in SYNTHESIS_SIGNALS
    )
    for r in standard:
        r["split"] = benchmark[r["model_id"]]["split"]
        r["neural_cleanse"] = benchmark[r["model_id"]].get("neural_cleanse", {})
    train = [r for r in standard if r["split"] == "train"]
    extra = [r for path in args.extra_train for r in part_records(path, args.part)]
    train_all = train + extra
    by_domain = {d: sum(r["domain"] == d for r in train_all) for d in sorted({r["domain"] for r in train_all})}
    held_out = [r for r in standard if r["split"] == "test"]
    checks = {f"standard zoo, held-out {d}": [r for r in held_out if r["domain"] == d] for d in ("cv", "fl")}
    checks = {name: rows for name, rows in checks.items() if rows}
    checks |= {path: part_records(path, args.part) for path in args.check}

    runs = {(signals, c): cv_scores(train_all, signals, c) for signals in spec.candidates() for c in CS}
    choice = {k: mean_auroc(v, train_all) for k, v in runs.items()}
    baseline = {c: cv_auroc(train_all, spec.base, c) for c in CS}
    (signals, c), best = max(choice.items(), key=lambda kv: kv[1])
    y = [int(r["is_backdoored"]) for r in train_all]
    part = fit_scan_head([r["metashield"]["signals"] for r in train_all], y, c=c, signals=signals)
    if args.target_fpr:
        # a part fit with a strong L2 penalty scores clean models near the train set's share of backdoored ones, so
        # 0.5 says little about how many it flags; this ties the verdict to a false-positive rate
        clean = np.array([not r["is_backdoored"] for r in train_all])
        part.threshold = fpr_threshold(runs[(signals, c)], clean, args.target_fpr)
    part.source = f"fit on {len(train_all)} image models scanned with the {args.part} synthesis ({sum(y)} bd)"
    shipped = ScanHead.load(DEFAULT_SCAN_HEAD)
    parts = {k: v for k, v in (shipped.by_modality or {}).items() if k != key}
    base = ScanHead(**{**shipped.__dict__, "by_modality": parts or None})
    new_part = {k: v for k, v in part.__dict__.items() if k != "by_modality"}
    with_part = ScanHead(**{**base.__dict__, "by_modality": {**parts, key: new_part}})
    with_part.save(Path(args.out).with_suffix(".head.json"))

    table = {}
    without, added = f"MetaShield scan without the {args.part} synthesis", f"MetaShield scan + {args.part} synthesis"
    for name, records in checks.items():
        for r in records:
            r["metashield"]["score_base"] = score(base, r)
            r["metashield"]["score_part"] = score(with_part, r)
        steps = sorted({s for r in records for s in r.get("neural_cleanse", {})}, key=int)
        table[name] = {
            f"{without} (shipped head)": summarize(
                without_time(records, spec.timing), "score_base", base, "metashield"
            ),
            f"{added}, {key} part": summarize(records, "score_part", with_part, "metashield"),
            **{
                f"Neural Cleanse ({s} steps)": summarize(
                    records, "score", NEURAL_CLEANSE_THRESHOLD, f"neural_cleanse@{s}"
                )
                for s in steps
                if all(s in r.get("neural_cleanse", {}) for r in records)
            },
        }
    scanned = standard + extra + [r for path in args.check for r in checks[path]]
    budgets = {
        name: sorted({r["metashield"].get(field, 0) for r in scanned})
        for name, field in (("mask", "steps"), ("blend", "blend_steps"), ("source-specific", "source_steps"))
    }
    n_base = len(spec.base)
    lines = [
        f"# Scan with the {args.part} synthesis: the head's `{key}` part",
        "",
        f"Written by `scripts/scan_blend.py`; reproduce: `python {' '.join(sys.argv)}`.",
        "",
        "- synthesis steps: "
        + "; ".join(f"{name} {steps}" for name, steps in budgets.items() if any(steps))
        + f"; the first {N_CLEAN} clean probe inputs, seed {SEED} (scripts/scan_check.py)",
        f"- rescans of the standard zoo's image models ({len(standard)} of them; {len(train)} train, "
        f"{len(held_out)} held out): largest difference of a synthesis signal from the "
        f"benchmark's records: {drift:.2e}",
        f"- train rows: {len(train)} of the standard zoo + {len(extra)} of "
        f"{', '.join(args.extra_train) or 'no other zoo'} (per domain: {by_domain})",
        f"- cross-validated AUROC on them (20 x 5-fold), the base signals {list(spec.base)} alone: "
        + ", ".join(f"C={c:g} {a:.3f}" for c, a in baseline.items()),
        "- candidates, the base + : "
        + "; ".join(f"{list(s)[n_base:]} C={c:g} {a:.3f}" for (s, c), a in choice.items()),
        f"- chosen: the base + {list(signals)[n_base:]} at C={c:g} ({best:.3f}); "
        f"the part: `{json.dumps(with_part.by_modality[key], sort_keys=True)}`",
        f"- verdict threshold: {with_part.by_modality[key]['threshold']:.3f}, "
        + (
            f"the score that flags {args.target_fpr:.0%} of the train clean models by the same cross-validation "
            f"(`--target_fpr {args.target_fpr:g}`)"
            if args.target_fpr
            else "the probability 0.5 (`--target_fpr 0`)"
        ),
        "",
        "| group | method | AUROC | accuracy | target accuracy | s / scan |",
        "|---|---|---:|---:|---:|---:|",
        *table_rows(table),
        "",
        f"Per model (held-out and check rows): score without / with the {args.part} part, and `{spec.shown}`:",
        "",
        f"| group | model | backdoored | without | with | {spec.shown} |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, records in checks.items():
        for r in sorted(records, key=lambda r: r["model_id"]):
            ms = r["metashield"]
            lines.append(
                f"| {name} | {r['model_id']} | {r['is_backdoored']} | {ms['score_base']:.3f} | {ms['score_part']:.3f} "
                f"| {ms['signals'][spec.shown]:.2f} |"
            )
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"choice": {f"{list(s)} C={c:g}": a for (s, c), a in choice.items()}, "groups": table}, indent=1)
    )
    if args.ship:
        with_part.save(DEFAULT_SCAN_HEAD)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
