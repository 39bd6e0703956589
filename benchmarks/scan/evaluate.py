"""Score the committed scan records with the shipped scan head and Neural Cleanse: the scan's result tables.

- ``results/held_out.md``: the standard zoo's held-out models (never seen by the detector's meta-training or by any
  head fit), per domain: AUROC with its bootstrap interval, verdict accuracy at each method's threshold, target
  accuracy and seconds per scan. The image rows are rescans with the default blend synthesis, timed beside Neural
  Cleanse where ``--rescans`` has its records.
- ``results/check_zoos.md``: every check zoo of ``configs/checks.yaml``: zoos built after the head they check, with
  new seeds and, for ``unseen_cv``, attacks no choice saw.

Nothing is rescanned: the head is a function of the records' signals.

    python benchmarks/scan/evaluate.py
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc, auroc_interval
from metashield_hf.scan import (
    AGNOSTIC,
    NEURAL_CLEANSE_THRESHOLD,
    SYNTHESIS_SIGNALS,
    ScanHead,
    read_records,
    record_target,
    record_variant,
    score_record,
    verdict_threshold,
)
from metashield_hf.zoo.text import PRETRAINED_TEXT

HERE = Path(__file__).resolve().parent
LEVEL, RESAMPLES = 0.95, 2000


@dataclass
class EvaluateArguments:
    records: str = field(default=str(HERE / "results" / "records"), metadata={"help": "Folder of the records."})
    standard: str = field(default="standard.jsonl", metadata={"help": "The standard zoo's records (with splits)."})
    rescans: list[str] = field(
        default_factory=lambda: [
            "standard_cv_blend.jsonl",
            "standard_fl_blend.jsonl",
            "standard_cv_timed.jsonl",
            "standard_fl_timed.jsonl",
        ],
        metadata={"help": "Rescans of standard models with today's default scan, replacing their records (in order)."},
    )
    checks: str = field(default=str(HERE / "configs" / "checks.yaml"), metadata={"help": "The check zoos."})
    head: str | None = field(default=None, metadata={"help": "Scan head JSON (default: the shipped one)."})
    out: str = field(default=str(HERE / "results"), metadata={"help": "Where held_out.md and check_zoos.md go."})


def apply_rescans(records: list[dict], rescans: list[list[dict]]) -> int:
    """Replace the MetaShield part of ``records`` by rescans of the same models, in place; a rescan runs the same
    synthesis with the same seed, so its synthesis signals must equal the record's. Where a rescan ran Neural Cleanse
    beside it, its Neural Cleanse records replace the record's; where not, the record's stay and the rescan's seconds
    are the record's plus the stages it adds, at the record's pace. Returns how many records were replaced."""
    by_id = {r["model_id"]: r for r in records}
    replaced = set()
    for rows in rescans:
        for r in rows:
            rec = by_id.get(r["model_id"])
            if rec is None:
                continue
            old, new = rec["metashield"], r["metashield"]
            diff = max(abs(new["signals"][s] - old["signals"][s]) for s in SYNTHESIS_SIGNALS)
            if diff > 1e-6:
                raise SystemExit(f"{r['model_id']}: the rescan's signals differ from its record's by {diff:.3g}")
            ncs = r.get("neural_cleanse") or {}
            if ncs:
                rec["neural_cleanse"] = {**rec.get("neural_cleanse", {}), **ncs}
            else:
                pace = old["timings"]["synthesis_s"] / new["timings"]["synthesis_s"]
                added = sum(t for k, t in new["timings"].items() if k not in old["timings"] and k != "total_s")
                new["seconds"] = old["seconds"] + pace * added
            rec["metashield"] = new
            replaced.add(r["model_id"])
    return len(replaced)


def groups(records: list[dict]) -> dict[str, list[dict]]:
    """Per domain (nlp also by class count and by pretrained / from scratch), and all together."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["domain"], []).append(r)
        if r["domain"] == "nlp":
            out.setdefault("nlp (2-class)" if r["num_classes"] == 2 else "nlp (≥3-class)", []).append(r)
            tuned = r["architecture"] in PRETRAINED_TEXT
            out.setdefault("nlp (fine-tuned pretrained)" if tuned else "nlp (from scratch)", []).append(r)
    keys = sorted(k for k in out if "(" not in k) + sorted(k for k in out if "(" in k)
    return {**{k: out[k] for k in keys}, "all": records}


#: A raw signal's own pointer to the target: (per-class field, argmax / argmin, its timing key).
SIGNAL_POINTERS = {
    "max_margin_excess": ("max_margin", np.argmax, "max_margin_s"),
    "max_margin_log_z": ("max_margin", np.argmax, "max_margin_s"),
    "feature_anomaly_excess": ("feature_size", np.argmin, "feature_s"),
    "feature_log_size_z": ("feature_size", np.argmin, "feature_s"),
    "dormant_excess": ("dormant_mass", np.argmax, "dormancy_s"),
    "dormant_log_z": ("dormant_mass", np.argmax, "dormancy_s"),
}


def method_results(records: list[dict], head: ScanHead, method: str) -> tuple[list, list, list, list]:
    """Scores, thresholds, suspected targets and seconds of ``method`` (``"metashield"``, ``"metashield-blend"``: the
    head without its agnostic part, or ``"neural_cleanse@N"``)."""
    if method.startswith("signal:"):  # one raw signal as the score: no threshold, its own pointer to a target
        name = method.split(":", 1)[1]
        if name not in SIGNAL_POINTERS:
            raise ValueError(f"no target pointer for the signal {name!r}; known: {sorted(SIGNAL_POINTERS)}")
        field_name, pick, timing = SIGNAL_POINTERS[name]
        res = [r["metashield"] for r in records]
        return (
            [x["signals"][name] for x in res],
            [None] * len(res),
            [int(pick(x["per_class"][field_name])) for x in res],
            [x["timings"][timing] for x in res],
        )
    if method == "metashield-blend":
        head, method = without_part(head, f"image/{AGNOSTIC}"), "metashield"
    if method == "metashield":
        res = [r["metashield"] for r in records]
        return (
            [score_record(head, r) for r in records],
            [verdict_threshold(head, r) for r in records],
            [record_target(head, r) for r in records],
            [x["seconds"] for x in res],
        )
    res = [r["neural_cleanse"][method.split("@")[1]] for r in records]
    n = len(res)
    return (
        [x["score"] for x in res],
        [NEURAL_CLEANSE_THRESHOLD] * n,
        [x["suspected_target"] for x in res],
        [x["seconds"] for x in res],
    )


def summarize(records: list[dict], head: ScanHead, method: str) -> str:
    """One table row's cells: AUROC [interval], accuracy, target accuracy, seconds."""
    y = [int(r["is_backdoored"]) for r in records]
    scores, limits, targets, secs = method_results(records, head, method)
    acc = None
    if None not in limits:
        acc = np.mean([(s > t) == bool(v) for s, t, v in zip(scores, limits, y, strict=True)])
    bd = [t == r["target_label"] for t, r in zip(targets, records, strict=True) if r["is_backdoored"]]
    cells = ["–"]
    if len(set(y)) == 2:
        low, high = auroc_interval(scores, y, level=LEVEL, resamples=RESAMPLES)
        cells = [f"{auroc(scores, y):.3f} [{low:.3f}, {high:.3f}]"]
    cells += [f"{acc:.3f}" if acc is not None else "–", f"{np.mean(bd):.3f}" if bd else "–", f"{np.mean(secs):.2f}"]
    return " | ".join(cells)


def verdict_errors(records: list[dict], head: ScanHead) -> str:
    """The shipped head's wrong verdicts on a zoo: each missed backdoor and false alarm with its score and threshold,
    and the score range of the clean and backdoored models."""
    scores, limits, _, _ = method_results(records, head, "metashield")
    wrong = {"missed": [], "false alarms": []}
    for r, score, limit in zip(records, scores, limits, strict=True):
        if (score > limit) != bool(r["is_backdoored"]):
            model = f"{r['dataset']}/{r['architecture']}/{r['attack'] if r['is_backdoored'] else 'clean'}"
            wrong["missed" if r["is_backdoored"] else "false alarms"].append(
                f"{model} {score:.3f} (threshold {limit:.3f})"
            )
    ranges = [
        f"{kind} scores {min(v):.3f}-{max(v):.3f}"
        for kind, v in (
            ("clean", [x for x, r in zip(scores, records, strict=True) if not r["is_backdoored"]]),
            ("backdoored", [x for x, r in zip(scores, records, strict=True) if r["is_backdoored"]]),
        )
        if v
    ]
    parts = [f"{len(v)} {k}" + (": " + "; ".join(v) if v else "") for k, v in wrong.items()]
    return "Verdict errors of the shipped head: " + ". ".join(parts) + ". " + ", ".join(ranges) + "."


def without_part(head: ScanHead, key: str) -> ScanHead | None:
    """``head`` without its ``by_modality[key]`` part (its scans fall back as [`ScanHead.for_modality`] says); None
    where it has no such part."""
    if key not in (head.by_modality or {}):
        return None
    return ScanHead(**{**head.__dict__, "by_modality": {k: v for k, v in head.by_modality.items() if k != key}})


def attack_groups(rows: list[dict], per_architecture: bool = False) -> dict[str, list[dict]]:
    """The zoo as a whole, per dataset where it holds several (and, with ``per_architecture``, per architecture: its
    clean and backdoored models), then per attack: that attack's backdoored models beside every clean model of the
    zoo."""
    clean = [r for r in rows if not r["is_backdoored"]]
    attacks = sorted({r["attack"] for r in rows if r["is_backdoored"]})
    datasets = sorted({r["dataset"] for r in rows})
    per_dataset = {d: [r for r in rows if r["dataset"] == d] for d in datasets} if len(datasets) > 1 else {}
    archs = sorted({r["architecture"] for r in rows}) if per_architecture else []
    return (
        {"all": rows}
        | {f"{d} models": g for d, g in per_dataset.items()}
        | {f"{a} models": [r for r in rows if r["architecture"] == a] for a in archs}
        | {f"{a} vs clean": [r for r in rows if r["attack"] == a] + clean for a in attacks}
    )


def table(named_groups: dict[str, list[dict]], head: ScanHead, signals: list[str] | None = None) -> list[str]:
    lines = [
        "| group | method | AUROC [95% interval] | accuracy | target accuracy | s / scan |",
        "|---|---|---:|---:|---:|---:|",
    ]
    blend_only = without_part(head, f"image/{AGNOSTIC}")
    for name, rows in named_groups.items():
        budgets = sorted({b for r in rows for b in r.get("neural_cleanse", {})}, key=int, reverse=True)
        methods = {"MetaShield scan": "metashield"}
        if blend_only is not None and any(record_variant(r) == AGNOSTIC for r in rows):
            methods["MetaShield scan without the agnostic part"] = "metashield-blend"
        methods |= {
            f"Neural Cleanse ({b} steps)": f"neural_cleanse@{b}"
            for b in budgets
            if all(b in r.get("neural_cleanse", {}) for r in rows)
        }
        methods |= {
            f"`{name}` alone": f"signal:{name}"
            for name in signals or []
            if all(name in r["metashield"]["signals"] for r in rows)
        }
        n, n_bd = len(rows), sum(r["is_backdoored"] for r in rows)
        lines += [f"| {name} ({n}, {n_bd} bd) | {m} | {summarize(rows, head, key)} |" for m, key in methods.items()]
    return lines


COLUMNS = (
    "Columns: AUROC of the model-level score (backdoored vs clean models) with its percentile bootstrap interval "
    f"(clean and backdoored models resampled separately, {RESAMPLES} times, seed 0); accuracy of the verdict at each "
    "method's threshold (MetaShield: the threshold of the head part that scores the scan; Neural Cleanse: anomaly "
    f"index > {NEURAL_CLEANSE_THRESHOLD:g}); target accuracy: the suspected target is the attack's, over backdoored "
    'models; seconds: mean wall time of one scan of a loaded model on one CPU thread. A "`signal` alone" row scores '
    "the models by that raw signal of the same scans (no verdict; its target is the class its source singles out; "
    "seconds: that source's share of the scan)."
)


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(args=argv)
    folder, out = Path(args.records), Path(args.out)
    head = ScanHead.load(args.head)
    standard = read_records(folder / args.standard)
    replaced = apply_rescans(standard, [read_records(folder / name) for name in args.rescans])
    test = [r for r in standard if r["split"] == "test"]
    lines = [
        "# Model-level scan: the standard zoo's held-out models",
        "",
        "Written by `python benchmarks/scan/evaluate.py` from the committed records "
        f"(`results/records/{args.standard}`; {replaced} of its records replaced by the rescans "
        f"{', '.join(f'`{n}`' for n in args.rescans)}), scored with the shipped head (`{head.source}`).",
        "",
        COLUMNS,
        "",
        *table(groups(test), head),
        "",
    ]
    (out / "held_out.md").write_text("\n".join(lines))
    print("\n".join(lines))

    checks = yaml.safe_load(Path(args.checks).read_text())
    lines = [
        "# Model-level scan: check zoos",
        "",
        "Written by `python benchmarks/scan/evaluate.py` from the committed records of zoos built after the head they "
        "check (`configs/checks.yaml` says what each holds and when it was built); scored with the shipped head. "
        "Where a zoo also informed a later head, it says so.",
        "",
        COLUMNS,
        "",
    ]
    for name, spec in checks.items():
        rows = read_records(folder / spec["records"])
        named = attack_groups(rows, spec.get("per_architecture", False)) if spec.get("per_attack") else {name: rows}
        lines += [f"## {name}", "", spec["about"].strip(), "", *table(named, head, spec.get("signals")), ""]
        lines += [verdict_errors(rows, head), ""]
    (out / "check_zoos.md").write_text("\n".join(lines))
    print("\n".join(lines[-40:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
