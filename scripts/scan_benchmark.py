"""Model-level scan benchmark on the standard zoo (held-out split); writes ``reports/scan.md`` + ``reports/scan.json``.

For every model of the zoo, [`scan_model`] runs once (default head) on the first 20 clean probe inputs, seed 0, and
its signals are kept. The scan head is fit with [`fit_scan_head`] on the *train* models of the meta-training split
(``artifacts/meta/maml/split.json``, plus the ``--head_train`` list) and saved to ``artifacts/meta/scan_head.json``;
the held-out (*test*) models are re-scored with it from the stored signals (the head is a function of the signals
only, so no re-synthesis), and
[`neural_cleanse_scan`] runs on the same 20 clean inputs of each test model. The fitted head replaces the shipped
default (``src/metashield_hf/default_detector/scan_head.json``) only if it has a strictly higher held-out AUROC
(``--ship``).

Per-model records are appended to ``OUT.jsonl`` as they are computed; a rerun skips the model ids already there.
``--shard I/N`` scans every N-th model from the I-th into ``OUT.shardIofN.jsonl`` and writes no report: run N of them
side by side (one per core), then once without ``--shard`` to merge the records and write the report.

Usage:

    python scripts/scan_benchmark.py --zoo artifacts/zoo/standard --split artifacts/meta/maml/split.json \\
        --steps 80 --out reports/scan   # add --ship to copy a better fitted head over the default
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from metashield_hf.evaluation.metrics import auroc, auroc_interval
from metashield_hf.scan import (
    NEURAL_CLEANSE_THRESHOLD,
    class_count_signals,
    neural_cleanse_scan,
    scan_model,
    token_detector_signal,
    token_signals,
)
from metashield_hf.scan_head import (
    BLEND,
    DEFAULT_SCAN_HEAD,
    LARGE_VOCABULARY,
    SOURCE,
    SYNTHESIS_SIGNALS,
    TOKEN_SIGNALS,
    ScanHead,
    fit_scan_head,
)
from metashield_hf.zoo import load_zoo, row_probe, row_to_target
from metashield_hf.zoo.text import PRETRAINED_TEXT

N_CLEAN = 20
SEED = 0
META_COLUMNS = ["model_id", "domain", "dataset", "architecture", "attack", "target_label", "is_backdoored"]
DEFAULT_STEPS = inspect.signature(scan_model).parameters["steps"].default
DEFAULT_REFINE = inspect.signature(scan_model).parameters["refine"].default
DEFAULT_SCREEN = inspect.signature(scan_model).parameters["screen_steps"].default
# Neural Cleanse runs at the scan's own budget and at this shorter one, to show what a shorter synthesis costs it
SHORT_STEPS = 40


def _nc_record(report) -> dict:
    return {
        "score": report.score,
        "suspected_target": report.suspected_target,
        "seconds": report.timings["total_s"],
        "timings": report.timings,
        "steps": report.options["steps"],
    }


def scan_row(
    row: dict,
    split: str,
    workdir: Path,
    steps: int,
    nc_steps: list[int],
    reuse_nc: dict | None = None,
    refine: int | None = DEFAULT_REFINE,
    screen_steps: int = DEFAULT_SCREEN,
    blend_steps: int | None = None,
    source_steps: int = 0,
) -> dict:
    """Scan one zoo row (MetaShield default head; plus Neural Cleanse at each of ``nc_steps`` on test models, or its
    record from ``reuse_nc`` where that has one at that budget) and return its record."""
    rec = {k: row[k] for k in META_COLUMNS}
    rec["split"] = split
    ncs = {str(s): (reuse_nc or {}).get(row["model_id"], {}).get(str(s)) for s in nc_steps}
    target = row_to_target(row, workdir)
    clean, _, _ = row_probe(row)
    clean = clean[:N_CLEAN]
    ms = scan_model(
        target,
        clean,
        steps=steps,
        refine=refine,
        screen_steps=screen_steps,
        seed=SEED,
        blend_steps=blend_steps,
        source_steps=source_steps,
    )
    rec["num_classes"] = len(ms.per_class)
    rec["modality"] = "text" if ms.space in ("embeddings", "tokens") else "image"
    rec["metashield"] = {
        "signals": ms.signals,
        "score_default": ms.score,
        "suspected_target": ms.suspected_target,
        "seconds": ms.timings["total_s"],
        "timings": ms.timings,
        "space": ms.space,
        "large_vocabulary": ms.options["large_vocabulary"],
        "steps": steps,
        "refine": ms.options["refine"],
        "screen_steps": ms.options["screen_steps"],
        "blend_steps": ms.options["blend_steps"],
        "source_steps": ms.options["source_steps"],
        # per-class evidence, so other model-level signals can be studied on the train records without a rescan
        "per_class": {
            "trigger_size": [c.trigger_size for c in ms.per_class],
            "flip_rate": [c.flip_rate for c in ms.per_class],
            "anomaly_index": [c.anomaly_index for c in ms.per_class],
            "detector_score": [c.detector_score for c in ms.per_class],
            **({"blend_size": [c.blend_size for c in ms.per_class]} if ms.options["blend_steps"] else {}),
            **({"source_size": [c.source_size for c in ms.per_class]} if ms.options["source_steps"] else {}),
        },
    }
    if ms.options.get("token_search"):
        rec["metashield"]["tokens"] = [
            {
                "trigger": c.token_trigger,
                "flip_rates": c.token_flip_rates,
                "target_probs": c.token_target_probs,
                "low_probs": c.token_low_probs,
                "dominance": c.token_dominance,
            }
            for c in ms.per_class
        ]
    if split == "test":
        rec["neural_cleanse"] = {}
        for s in nc_steps:
            rec["neural_cleanse"][str(s)] = ncs[str(s)] or _nc_record(
                neural_cleanse_scan(target, clean, steps=s, seed=SEED)
            )
    shutil.rmtree(workdir / row["model_id"], ignore_errors=True)
    return rec


def load_reuse_nc(path: Path, steps: int, budgets: list[int] | None = None) -> dict[str, dict]:
    """Neural Cleanse records of an earlier run, by model id and budget (only ``budgets`` where given). A record
    without a budget (the format before ``--nc_steps``) is taken to have run at ``steps``, that run's ``--steps``."""
    out: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        nc = rec.get("neural_cleanse")
        if nc:
            nc = {str(steps): {**nc, "steps": steps}} if "score" in nc else nc
            out[rec["model_id"]] = {b: r for b, r in nc.items() if budgets is None or int(b) in budgets}
    return out


def shard_of(spec: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` as ``(I, N)`` (``None`` without one)."""
    if spec is None:
        return None
    i, n = (int(v) for v in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= I < N")
    return i, n


def records_path(out: Path, shard: tuple[int, int] | None) -> Path:
    """Where a run appends its records: ``OUT.jsonl``, or ``OUT.shardIofN.jsonl`` for a shard."""
    return (
        out.with_suffix(".jsonl") if shard is None else out.with_name(f"{out.name}.shard{shard[0]}of{shard[1]}.jsonl")
    )


def load_records(out: Path) -> dict[str, dict]:
    """The records of ``OUT.jsonl`` and of its shards, by model id (a rerun skips these models)."""
    done: dict[str, dict] = {}
    for path in [out.with_suffix(".jsonl"), *sorted(out.parent.glob(f"{out.name}.shard*.jsonl"))]:
        for line in path.read_text().splitlines() if path.exists() else []:
            if line.strip():
                rec = json.loads(line)
                done[rec["model_id"]] = rec
    return done


def merge_shards(out: Path, done: dict[str, dict], ids: list[str]) -> None:
    """Once the shards have run: their records (and OUT.jsonl's) into ``OUT.jsonl`` in ``ids`` order, shard files
    deleted. Nothing to do without shard files."""
    shard_files = sorted(out.parent.glob(f"{out.name}.shard*.jsonl"))
    if shard_files:
        with out.with_suffix(".jsonl").open("w") as fh:
            fh.writelines(json.dumps(done[m]) + "\n" for m in ids if m in done)
        for path in shard_files:
            path.unlink()


def _total_s(rec: dict) -> float:
    return rec["metashield"]["seconds"] + sum(nc["seconds"] for nc in rec.get("neural_cleanse", {}).values())


def _auroc(scores: list[float], labels: list[int]) -> float | None:
    try:
        return auroc(scores, labels)
    except ValueError:  # only one class present
        return None


def _result(rec: dict, method: str) -> dict:
    """A record's result of ``method``: ``"metashield"`` or ``"neural_cleanse@STEPS"``."""
    return rec["neural_cleanse"][method.split("@")[1]] if method.startswith("neural_cleanse@") else rec["metashield"]


def method_scores(records: list[dict], score_key: str, method: str) -> list[float]:
    """The records' scores by ``method``: Neural Cleanse's own, or MetaShield's under ``score_key`` (one per head)."""
    key = "score" if method.startswith("neural_cleanse@") else score_key
    return [_result(r, method)[key] for r in records]


def summarize(records: list[dict], score_key: str, threshold: float | ScanHead, method: str) -> dict:
    """AUROC / accuracy / target accuracy / seconds of one method over a group of test records; ``threshold``: the
    method's, or the head whose part for each record ([`verdict_threshold`]) gives that record's."""
    labels = [int(r["is_backdoored"]) for r in records]
    results = [_result(r, method) for r in records]
    scores = method_scores(records, score_key, method)
    targets = [res["suspected_target"] for res in results]
    secs = [res["seconds"] for res in results]
    limits = [verdict_threshold(threshold, r) if isinstance(threshold, ScanHead) else threshold for r in records]
    preds = [int(s > t) for s, t in zip(scores, limits, strict=True)]
    bd = [(t, r["target_label"]) for t, r in zip(targets, records, strict=True) if r["is_backdoored"]]
    # a head that cannot score some records (the prior head on text scans without synthesis signals): no AUROC
    scorable = bool(records) and bool(np.isfinite(scores).all())
    return {
        "n": len(records),
        "n_backdoored": int(sum(labels)),
        "auroc": _auroc(scores, labels) if scorable else None,
        "accuracy": float(np.mean([p == y for p, y in zip(preds, labels, strict=True)])) if scorable else None,
        "target_accuracy": float(np.mean([t == y for t, y in bd])) if bd else None,
        "mean_seconds": float(np.mean(secs)) if secs else None,
    }


INTERVAL_LEVEL, INTERVAL_RESAMPLES = 0.95, 2000


def auroc_intervals(records: list[dict], methods: dict[str, tuple]) -> dict[str, dict[str, tuple[float, ...]]]:
    """Per domain and overall (the [`groups`] without nlp's subgroups), per method (``name: (score key, threshold,
    method)`` as for [`summarize`]): ``(AUROC, low, high)`` with its bootstrap interval ([`auroc_interval`])."""
    out: dict[str, dict[str, tuple[float, ...]]] = {}
    for g, rs in groups(records).items():
        if g.startswith("nlp ("):
            continue
        labels = [int(r["is_backdoored"]) for r in rs]
        if len(set(labels)) < 2:  # no AUROC without both kinds of model
            continue
        for name, (key, _, method) in methods.items():
            scores = method_scores(rs, key, method)
            low, high = auroc_interval(scores, labels, level=INTERVAL_LEVEL, resamples=INTERVAL_RESAMPLES)
            out.setdefault(g, {})[name] = (auroc(scores, labels), low, high)
    return out


def groups(records: list[dict]) -> dict[str, list[dict]]:
    """Per domain (nlp also split into ≥3-class and 2-class models, and into models trained from scratch and
    fine-tuned from a pretrained encoder) and overall."""
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["domain"], []).append(r)
        if r["domain"] == "nlp":
            out.setdefault("nlp (2-class)" if r["num_classes"] == 2 else "nlp (≥3-class)", []).append(r)
            pretrained = r["architecture"] in PRETRAINED_TEXT
            out.setdefault("nlp (fine-tuned pretrained)" if pretrained else "nlp (from scratch)", []).append(r)
    keys = sorted(k for k in out if not k.startswith("nlp (")) + sorted(k for k in out if k.startswith("nlp ("))
    result = {k: out[k] for k in keys}
    result["all"] = records
    result["all except 2-class"] = [r for r in records if r["num_classes"] > 2]
    return result


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table_rows(table: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown rows ``| group | method | AUROC | accuracy | target accuracy | s / scan |`` of ``table[group][method]``
    (a [`summarize`] result each)."""
    return [
        f"| {group} ({s['n']}, {s['n_backdoored']} bd) | {m} | {_fmt(s['auroc'])} | {_fmt(s['accuracy'])} | "
        f"{_fmt(s['target_accuracy'])} | {_fmt(s['mean_seconds'], 2)} |"
        for group, by_method in table.items()
        for m, s in by_method.items()
    ]


def signals_alone(rows: list[dict]) -> str:
    """Each token signal's own AUROC over the text records ``rows`` (those signals every record has)."""
    y = [int(r["is_backdoored"]) for r in rows]
    names = [n for n in TOKEN_SIGNALS if all(n in r["metashield"]["signals"] for r in rows)]
    return ", ".join(f"{n} {auroc([r['metashield']['signals'][n] for r in rows], y):.3f}" for n in names)


def render(summary: dict, meta: dict) -> str:
    lines = [
        "# Model-level scan: held-out zoo models",
        "",
        "Written by `scripts/scan_benchmark.py` from one run on this machine; nothing here is hand-typed. Reproduce:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        *[f"- {k}: {v}" for k, v in meta.items() if k != "command"],
        "",
        "Columns: AUROC of the model-level score over held-out models (backdoored vs clean); accuracy of the verdict "
        "at the method's default threshold (MetaShield heads: 0.5 on the probability; Neural Cleanse: anomaly "
        f"index > {NEURAL_CLEANSE_THRESHOLD:g}); target accuracy = suspected target equals the row's `target_label`, "
        "over backdoored models only; seconds = mean wall time of one scan on an already loaded model "
        "(`timings.total_s`, 1 CPU thread). 2-class nlp models are listed separately: with two classes the anomaly "
        "index (MAD over classes) is degenerate, so Neural Cleanse cannot single out a target there; MetaShield's text "
        "scans also search the vocabulary for short token triggers (`metashield_hf.token_search`), whose signals the "
        "text head uses.",
        "",
    ]
    lines += ["## Headline: per domain, held-out models", ""]
    lines += [
        "| group | method | AUROC | accuracy | target accuracy | s / scan |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += table_rows(summary["groups"])
    lines.append("")
    if summary.get("intervals"):
        lines += [
            f"AUROC with its {INTERVAL_LEVEL:.0%} bootstrap interval ([`auroc_interval`]: clean and backdoored models "
            f"resampled separately, {INTERVAL_RESAMPLES} times, seed 0). With a few dozen models, one clean model scored "
            "above one backdoored model moves a group's AUROC by 1 / (clean x backdoored): 0.014 for 6 x 12.",
            "",
            "| group | " + " | ".join(next(iter(summary["intervals"].values()))) + " |",
            "|---|" + "---:|" * len(next(iter(summary["intervals"].values()))),
        ]
        lines += [
            f"| {g} | " + " | ".join(f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in by_method.values()) + " |"
            for g, by_method in summary["intervals"].items()
        ]
        lines.append("")
    lines += ["## Scan heads", ""]
    for name, head in summary["heads"].items():
        lines.append(f"- {name}: `{json.dumps(head, sort_keys=True)}`")
    lines += ["", f"Shipped: {summary['shipped']}", ""]
    return "\n".join(lines)


def refresh_token_signals(rec: dict) -> None:
    """Recompute a text record's token signals and suspected target from its stored per-class search results
    with the library's current [`token_signals`], so the report always matches the code (no re-search needed); and
    ``token_detector`` and the suspected target from its per-class detector scores where these are the token
    triggers'."""
    tokens = rec["metashield"].get("tokens")
    if not tokens:
        return
    arrays = SimpleNamespace(
        **{key: np.array([c[key] for c in tokens]) for key in ("flip_rates", "target_probs", "low_probs", "dominance")}
    )
    target, signals = token_signals(arrays)
    scores = rec["metashield"]["per_class"]["detector_score"]
    if "anomaly_index" not in rec["metashield"]["signals"] and None not in scores:  # the scores of token triggers
        target, detected = token_detector_signal(scores, arrays.flip_rates[:, -1])
        signals |= detected
    rec["metashield"]["signals"].update(signals)
    rec["metashield"]["suspected_target"] = target


def refresh_class_count_signals(rec: dict) -> None:
    """Recompute a record's class-count-corrected synthesis signals from its raw ones with the library's current
    [`class_count_signals`] (records written before the correction existed lack them)."""
    signals = rec["metashield"]["signals"]
    if "anomaly_index" not in signals:  # a text scan by the token search alone: no synthesis signals
        return
    signals.update(class_count_signals(signals["anomaly_index"], signals["log_size_ratio"], rec["num_classes"]))


def refresh(records: list[dict]) -> list[dict]:
    """``records`` with their token and class-count signals recomputed by the current library (in place)."""
    for r in records:
        refresh_token_signals(r)
        refresh_class_count_signals(r)
    return records


def extra_train_records(paths: list[str]) -> list[dict]:
    """Other zoos' scan records (``scripts/scan_check.py``'s ``OUT.jsonl``), refreshed, as train models of the head."""
    records = refresh([r for path in paths for r in load_records(Path(path).with_suffix("")).values()])
    for r in records:
        r["split"] = "train"
    return records


def apply_rescans(records: list[dict], paths: list[str]) -> tuple[int, float, int]:
    """Replace the MetaShield part of ``records`` with rescans of the same models (``scripts/scan_check.py``'s
    ``OUT.jsonl``, e.g. with the blend synthesis, which the benchmark's own scans predate), in place, file by file.

    A rescan runs the same synthesis on the same model with the same seed, so its four synthesis signals must equal
    the record's: anything else means another model or another library, and is an error. Splits stay. Where the
    rescan ran Neural Cleanse beside it (``--nc_steps``), its Neural Cleanse records replace the record's at those
    budgets (their scores must agree too), so both methods' seconds come from one run. Where it did not, the record's
    Neural Cleanse stays, and so that the scan's time still compares with it, a rescan's seconds are the record's plus
    the stages the record lacks (e.g. ``blend_s``) at the record's pace: their time in the rescan times the two runs'
    ratio of mask-synthesis times (``synthesis_s``); ``seconds_rescan`` keeps the rescan's own. Returns how many
    records were replaced, the largest signal difference seen and how many were timed beside Neural Cleanse.
    """
    by_id = {r["model_id"]: r for r in records}
    replaced, drift, timed = set(), 0.0, set()
    for path in paths:
        for r in refresh(list(load_records(Path(path).with_suffix("")).values())):
            rec = by_id.get(r["model_id"])
            if rec is None:
                continue
            old, new = rec["metashield"], r["metashield"]
            diff = max(abs(new["signals"][s] - old["signals"][s]) for s in SYNTHESIS_SIGNALS)
            ncs = r.get("neural_cleanse") or {}
            for budget, nc in ncs.items():
                if budget in rec.get("neural_cleanse", {}):
                    diff = max(diff, abs(nc["score"] - rec["neural_cleanse"][budget]["score"]))
            if diff > 1e-6:
                raise SystemExit(f"--rescans: {r['model_id']}'s signals differ from its record's by {diff:.3g}")
            if ncs:
                rec["neural_cleanse"] = {**rec.get("neural_cleanse", {}), **ncs}
                timed.add(r["model_id"])
            else:  # the stages the record lacks, at its pace (none after an earlier rescan: its time stays)
                pace = old["timings"]["synthesis_s"] / new["timings"]["synthesis_s"]
                new["seconds_rescan"] = new["seconds"]
                added = sum(t for k, t in new["timings"].items() if k not in old["timings"] and k != "total_s")
                new["seconds"] = old["seconds"] + pace * added
            rec["metashield"], drift = new, max(drift, diff)
            replaced.add(r["model_id"])
    return len(replaced), drift, len(timed)


def modality(rec: dict) -> str:
    return rec.get("modality", "text" if rec["domain"] == "nlp" else "image")


def variant(rec: dict) -> str | None:
    """The scan's head variant: ``LARGE_VOCABULARY`` for a text scan whose token search prefiltered the vocabulary,
    ``SOURCE`` for an image scan with the source-specific synthesis, ``BLEND`` for one with the blend synthesis only."""
    if rec["metashield"].get("large_vocabulary"):
        return LARGE_VOCABULARY
    if rec["metashield"].get("source_steps"):
        return SOURCE
    return BLEND if rec["metashield"].get("blend_steps") else None


def fit_heads(
    train: list[dict],
    c: float,
    text_signals: tuple[str, ...],
    text_c: float | None = None,
    large_signals: tuple[str, ...] = (),
) -> ScanHead:
    """One head on the image/tensor models' synthesis signals, and a text head (``by_modality["text"]``) on the
    text models' ``text_signals``: the token signals exist only for text, and mean different things there. With
    ``large_signals`` (and train text models of both kinds), the text models whose search prefiltered a large
    vocabulary get their own head on those signals (``by_modality["text/large_vocabulary"]``), and the text head is
    fit on the others. (The ``image/blend`` part, for scans with the blend synthesis, is fit by
    ``scripts/scan_blend.py``.)"""
    other = [r for r in train if modality(r) != "text"]
    text = [r for r in train if modality(r) == "text"]
    head = fit_scan_head([r["metashield"]["signals"] for r in other], [int(r["is_backdoored"]) for r in other], c=c)
    large = [r for r in text if variant(r) == LARGE_VOCABULARY] if large_signals else []
    small = [r for r in text if variant(r) != LARGE_VOCABULARY]
    if len({int(r["is_backdoored"]) for r in large}) < 2 or len({int(r["is_backdoored"]) for r in small}) < 2:
        large, small = [], text  # too few of a kind to fit a head apart
    parts = {}
    for key, rows, names in (("text", small, text_signals), (f"text/{LARGE_VOCABULARY}", large, large_signals)):
        if rows and names:
            sub = fit_scan_head(
                [r["metashield"]["signals"] for r in rows],
                [int(r["is_backdoored"]) for r in rows],
                c=c if text_c is None else text_c,
                signals=names,
            )
            parts[key] = {k: v for k, v in sub.__dict__.items() if k != "by_modality"}
    head.by_modality = parts or None
    return head


def score(head: ScanHead, rec: dict) -> float:
    """The head's score of a record; NaN where the record lacks a signal the head weighs (the prior head, which has
    no text part, on a text scan by the token search alone)."""
    signals = rec["metashield"]["signals"]
    head = head.for_modality(modality(rec), signals, variant(rec))
    if head.missing(signals):
        return float("nan")
    return head.score(signals)


def verdict_threshold(head: ScanHead, rec: dict) -> float:
    """The threshold of the head's part that scores a record ([`score`]): what ``scan_model``'s verdict compares
    the score with."""
    signals = rec["metashield"]["signals"]
    return head.for_modality(modality(rec), signals, variant(rec)).threshold


def _strata(train: list[dict]) -> list[str]:
    """Cross-validation strata of the train records: domain, label and head variant."""
    return [f"{r['domain']}{int(r['is_backdoored'])}{variant(r) == LARGE_VOCABULARY}" for r in train]


def out_of_fold_scores(
    train: list[dict],
    c: float,
    text_signals: tuple[str, ...],
    text_c: float | None = None,
    large_signals: tuple[str, ...] = (),
    repeats: int = 20,
    folds: int = 5,
) -> list[np.ndarray]:
    """Per repeat of a stratified k-fold split ([`_strata`]), every train record's score by the heads
    ([`fit_heads`]) fit on the other folds."""
    from sklearn.model_selection import StratifiedKFold

    out = []
    for rep in range(repeats):
        scores = np.zeros(len(train))
        for fit, held in StratifiedKFold(folds, shuffle=True, random_state=rep).split(train, _strata(train)):
            head = fit_heads([train[i] for i in fit], c, text_signals, text_c, large_signals)
            scores[held] = [score(head, train[i]) for i in held]
        out.append(scores)
    return out


def cv_head_c(
    train: list[dict],
    text_signals: tuple[str, ...],
    cs=(0.1, 1.0, 10.0),
    repeats: int = 20,
    folds: int = 5,
    text_c: float | None = None,
    large_signals: tuple[str, ...] = (),
) -> dict[float, dict[str, float]]:
    """Mean AUROC per domain over the train models of heads fit on the other folds ([`out_of_fold_scores`]), per C
    (``text_c``: the text head's C, fixed; default: the same C); for text also ``nlp (large vocabulary)`` and
    ``nlp (small vocabulary)`` where the train models have both. Uses train models only, so the held-out models play
    no part in choosing C."""
    y = np.array([int(r["is_backdoored"]) for r in train])
    groups = {d: np.array([r["domain"] == d for r in train]) for d in sorted({r["domain"] for r in train})}
    large = np.array([variant(r) == LARGE_VOCABULARY for r in train])
    nlp = groups.get("nlp", np.zeros(len(train), dtype=bool))
    if (nlp & large).any() and (nlp & ~large).any():
        groups["nlp (large vocabulary)"] = nlp & large
        groups["nlp (small vocabulary)"] = nlp & ~large
    out = {}
    for c in cs:
        runs = out_of_fold_scores(train, c, text_signals, text_c, large_signals, repeats, folds)
        out[c] = {g: float(np.mean([auroc(scores[m], y[m]) for scores in runs])) for g, m in groups.items()}
    return out


def fpr_threshold(runs: list[np.ndarray], clean: np.ndarray, fpr: float) -> float:
    """The score that flags a share ``fpr`` of the ``clean`` rows: the ``1 - fpr`` quantile of their out-of-fold
    scores pooled over the repeats ``runs``."""
    return float(np.quantile(np.concatenate([scores[clean] for scores in runs]), 1.0 - fpr))


def set_fpr_thresholds(head: ScanHead, train: list[dict], runs: list[np.ndarray], fpr: float) -> dict[str, float]:
    """Set the verdict threshold of the head and of each of its parts to the score that flags a share ``fpr`` of the
    clean train records it scores, by their out-of-fold scores ``runs`` ([`out_of_fold_scores`]); returns them by
    part (``"image"`` for the head itself).

    A logistic fit puts 0.5 where the train set's mix of clean and backdoored models does, which is not the mix a user
    meets; a threshold tied to a false-positive rate means the same thing for every part (as the input-level
    pipeline's ``target_fpr`` does)."""
    keys = [head.part_key(modality(r), r["metashield"]["signals"], variant(r)) for r in train]
    clean = np.array([not r["is_backdoored"] for r in train])
    out = {}
    for key in dict.fromkeys(keys):
        rows = np.array([k == key for k in keys]) & clean
        if not rows.any():
            continue
        value = fpr_threshold(runs, rows, fpr)
        if key is None:
            head.threshold = value
        else:
            head.by_modality[key]["threshold"] = value
        out[key or "image"] = value
    return out


def text_signal_choice(
    train: list[dict], text_signals: tuple[str, ...], text_c: float, large_signals: tuple[str, ...] = ()
) -> dict[str, str]:
    """How the text heads' signals were chosen, on the train text models only: each token signal's own AUROC (over
    all of them, and over the large-vocabulary ones), and the cross-validated nlp AUROC of the chosen heads against
    one text head on the same signals and on all of them."""
    text = [r for r in train if modality(r) == "text" and "token_prob" in r["metashield"]["signals"]]
    large = [r for r in text if variant(r) == LARGE_VOCABULARY]

    def cv(signals: tuple[str, ...], large_part: tuple[str, ...] = ()) -> str:
        aucs = cv_head_c(train, signals, cs=(text_c,), text_c=text_c, large_signals=large_part)[text_c]
        kinds = [f"{kind} vocabulary {aucs[f'nlp ({kind} vocabulary)']:.3f}" for kind in ("large", "small")]
        return f"{aucs['nlp']:.3f} ({', '.join(kinds)})" if "nlp (large vocabulary)" in aucs else f"{aucs['nlp']:.3f}"

    out = {f"token signals alone, AUROC on the {len(text)} train text models": signals_alone(text)}
    if large:
        out[f"the same on the {len(large)} whose search prefiltered a large vocabulary"] = signals_alone(large)
    key = f"text heads by cross-validation on train models (nlp AUROC, C={text_c:g})"
    out[key] = ""
    if large_signals:
        out[key] += f"text on {list(text_signals)}, large vocabulary on {list(large_signals)}: "
        out[key] += f"{cv(text_signals, large_signals)}; "
    out[key] += f"one text head on {list(text_signals)}: {cv(text_signals)}; on all {len(TOKEN_SIGNALS)} token "
    out[key] += f"signals: {cv(TOKEN_SIGNALS)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="artifacts/zoo/standard")
    parser.add_argument("--split", default="artifacts/meta/maml/split.json")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"trigger-synthesis steps (scan_model default: {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--refine",
        type=int,
        default=DEFAULT_REFINE,
        help="opt-in: classes refined to --steps after the screen (default: none, every class runs the full budget)",
    )
    parser.add_argument(
        "--screen_steps", type=int, default=DEFAULT_SCREEN, help=f"steps of the screen (default {DEFAULT_SCREEN})"
    )
    # 1: the best of 0.1 / 1 / 10 in cv_head_c on the 106 train image/tensor models' 80-step signals (the standard
    # zoo's 65 and configs/zoo/fresh_cv.yaml's 41: 0.985 against 0.984 and 0.985 for cv; the report lists them).
    # With the standard zoo's 65 alone it was 0.1.
    parser.add_argument("--head_c", type=float, default=1.0, help="inverse L2 strength of the head's logistic fit")
    parser.add_argument(
        "--target_fpr",
        type=float,
        default=0.0,
        help="set each fitted part's verdict threshold to flag this share of its train clean models by "
        "cross-validation (default 0: the probability 0.5; with 0.05 the held-out and check verdicts were right "
        "once less in stop 26, so the shipped image and text parts keep 0.5)",
    )
    # 1: with the text signals below, the better of 1 / 10 for the small-vocabulary part by cross-validation on the
    # train from-scratch text models (70: 0.863 against 0.858; 114: 0.861 against 0.859); the large-vocabulary part
    # scores about the same at both
    parser.add_argument("--text_head_c", type=float, default=1.0, help="the same for the text heads")
    parser.add_argument(
        "--text_signals",
        nargs="*",
        # the best of 7 candidate sets by cross-validation on the 70 train from-scratch text models (the standard
        # zoo's 26 and configs/zoo/scratch_text.yaml's 44; scripts/scan_text_choice.py): 0.863, against 0.843 for
        # the earlier token_prob + token_prob_2 and 0.842 for token_detector alone; on the 44 scratch_text models,
        # before they trained anything, token_detector was the best signal alone (0.847). With the 44 of
        # configs/zoo/fresh_scratch_text.yaml added (114 models) it is still the best: 0.861
        default=["token_logit_2", "token_detector"],
        help=f"signals of the text head (any of {list(SYNTHESIS_SIGNALS + TOKEN_SIGNALS)}; none: one head for all)",
    )
    parser.add_argument(
        "--large_vocabulary_signals",
        nargs="*",
        # token_detector: a head of its own on it for the scans that prefiltered a large vocabulary (fit on the 10
        # train MiniLM rows) scored AUROC 0.907 on the 15 fine-tuned MiniLM models of configs/zoo/fresh_minilm.yaml,
        # which no earlier choice was made on (reports/scan_fresh_minilm.md), against 0.796 for token_dominance_2
        # and 0.833 for both; cross-validation on the 10 train rows had preferred token_dominance_2 (1.000 against
        # 0.856 and 0.967), which they are too few to tell apart. With those 15 models added to the train side, it
        # is also the best by cross-validation (25 models: 0.909, against 0.878 and 0.875 at C=10)
        default=["token_detector"],
        help="signals of a separate head for text scans that prefiltered a large vocabulary (none: the text head)",
    )
    parser.add_argument(
        "--nc_steps",
        type=int,
        nargs="+",
        default=[DEFAULT_STEPS, SHORT_STEPS],
        help="Neural Cleanse budgets (synthesis steps) to run on the held-out models; the first is its headline row",
    )
    parser.add_argument(
        "--reuse_nc",
        default=None,
        help="JSONL of an earlier run whose Neural Cleanse records (same zoo, same budget) are reused, not rerun",
    )
    parser.add_argument(
        "--reuse_nc_budgets",
        type=int,
        nargs="+",
        default=None,
        help="reuse only these budgets of --reuse_nc's records (default: all); the others run afresh",
    )
    parser.add_argument(
        "--reuse_nc_steps", type=int, default=DEFAULT_STEPS, help="budget of --reuse_nc's records (older format)"
    )
    parser.add_argument("--out", default="reports/scan", help="writes OUT.jsonl (records), OUT.json and OUT.md")
    parser.add_argument("--head_out", default="artifacts/meta/scan_head.json")
    parser.add_argument("--workdir", default="artifacts/meta/scan_work", help="where checkpoints are unpacked")
    parser.add_argument("--ship", action="store_true", help="copy the fitted head over the default if it is better")
    parser.add_argument(
        "--unsplit",
        choices=["test", "skip"],
        default="test",
        help="zoo models the split does not list (never seen by the detector): held out (default) or left out",
    )
    parser.add_argument(
        "--head_train",
        default=None,
        help="file of zoo model ids (one per line, # comments) the head is also fit on, though the split does not "
        "list them (e.g. configs/scan/head_train.txt)",
    )
    parser.add_argument(
        "--extra_train",
        nargs="*",
        default=[],
        help="record files of other zoos' scans (scripts/scan_check.py's OUT.jsonl) whose models train the head too; "
        "they are never held out, and their scans are not rerun",
    )
    parser.add_argument(
        "--rescans",
        nargs="*",
        default=[],
        help="record files (scripts/scan_check.py's OUT.jsonl) of this zoo's models scanned again as scan_model does "
        "by default now (e.g. with the blend synthesis): their MetaShield part replaces the records' (checked)",
    )
    parser.add_argument("--report_only", action="store_true", help="scan nothing; report on the records in OUT.jsonl")
    parser.add_argument("--shard", default=None, help="I/N: scan only every N-th model from the I-th; no report")
    args = parser.parse_args()
    if not 0.0 <= args.target_fpr < 1.0:
        parser.error(f"--target_fpr must be in [0, 1), got {args.target_fpr}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shard = shard_of(args.shard)
    except ValueError as e:
        parser.error(str(e))
    jsonl = records_path(out, shard)
    workdir = Path(args.workdir)
    done = load_records(out)
    # a report needs only the records, which carry each model's split: on a machine without the zoo (and its split
    # file), --report_only rebuilds it from them
    from_records = args.report_only and not Path(args.zoo).exists()
    if from_records:
        ids = list(done)
        split_of = {m: r["split"] for m, r in done.items()}
    else:
        split = json.loads(Path(args.split).read_text())
        split_of = {m: "train" for m in split["train"]} | {m: "test" for m in split["test"]}
        zoo = load_zoo(args.zoo)
        ids = zoo["model_id"]
    head_train: set[str] = set()
    if args.head_train and not from_records:
        lines = Path(args.head_train).read_text().splitlines()
        head_train = {t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")}
        if head_train - set(ids) or head_train & set(split_of):
            parser.error(
                f"--head_train: {sorted(head_train - set(ids))} not in the zoo, {sorted(head_train & set(split_of))} "
                "already in the split"
            )
        split_of |= {m: "train" for m in head_train}
    unsplit = [m for m in ids if m not in split_of]
    if args.unsplit == "test":  # never seen by the detector's meta-training nor by the head fit
        split_of |= {m: "test" for m in unsplit}

    # held-out models first, so a partial run already has the comparison
    order = [i for i, m in enumerate(ids) if split_of.get(m) == "test"]
    order += [i for i, m in enumerate(ids) if split_of.get(m) == "train"]
    # a shard's share is cut from the fixed order, not from what is left: its siblings' records appear as they run
    share = order if shard is None else order[shard[0] :: shard[1]]
    todo = [] if args.report_only else [i for i in share if ids[i] not in done]
    # the head the scans ran with (kept so that a rerun after --ship still compares against the prior default)
    prior_path = out.with_name(out.name + ".prior_head.json")
    if not prior_path.exists():
        shutil.copyfile(DEFAULT_SCAN_HEAD, prior_path)
    reuse_nc = (
        load_reuse_nc(Path(args.reuse_nc), args.reuse_nc_steps, args.reuse_nc_budgets) if args.reuse_nc else None
    )
    start = time.perf_counter()
    with jsonl.open("a") as fh:
        for i in tqdm(todo, desc="scan", file=sys.stdout, mininterval=5):
            rec = scan_row(
                zoo[i], split_of[ids[i]], workdir, args.steps, args.nc_steps, reuse_nc, args.refine or None,
                args.screen_steps,
            )  # fmt: skip
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            done[rec["model_id"]] = rec
    run_s = time.perf_counter() - start
    if shard is not None:
        print(f"shard {args.shard}: {len(todo)} models scanned in {run_s:.0f} s -> {jsonl}")
        return

    merge_shards(out, done, ids)
    records = [done[ids[i]] for i in order if ids[i] in done]
    refresh(records)
    rescanned = apply_rescans(records, args.rescans) if args.rescans else None
    extra = extra_train_records(args.extra_train)
    if {r["model_id"] for r in extra} & set(ids):
        parser.error("--extra_train: records of models of this zoo; list them in --head_train instead")
    train = [r for r in records if r["split"] == "train"] + extra
    test = [r for r in records if r["split"] == "test"]
    default_head = ScanHead.load(prior_path)
    text_signals = tuple(args.text_signals)
    large_signals = tuple(args.large_vocabulary_signals)
    fitted = fit_heads(train, args.head_c, text_signals, args.text_head_c, large_signals)
    thresholds = {}
    if args.target_fpr:
        runs = out_of_fold_scores(train, args.head_c, text_signals, args.text_head_c, large_signals)
        thresholds = set_fpr_thresholds(fitted, train, runs, args.target_fpr)
    # the image/blend and image/source parts are fit by scripts/scan_blend.py on other records: a refit here keeps
    # the shipped ones
    shipped_parts = ScanHead.load(DEFAULT_SCAN_HEAD).by_modality or {}
    kept = {k: shipped_parts[k] for k in (f"image/{BLEND}", f"image/{SOURCE}") if k in shipped_parts}
    if kept:
        fitted.by_modality = {**(fitted.by_modality or {}), **kept}
    Path(args.head_out).parent.mkdir(parents=True, exist_ok=True)
    fitted.save(args.head_out)
    for r in test:
        r["metashield"]["score_fitted"] = score(fitted, r)
        r["metashield"]["score_default_rescored"] = score(default_head, r)

    methods = {
        "MetaShield scan (default head)": ("score_default_rescored", default_head, "metashield"),
        "MetaShield scan (fitted head)": ("score_fitted", fitted, "metashield"),
        **{
            f"Neural Cleanse ({s} steps)": ("score", NEURAL_CLEANSE_THRESHOLD, f"neural_cleanse@{s}")
            for s in args.nc_steps
        },
    }
    table = {
        g: {name: summarize(rs, key, thr, m) for name, (key, thr, m) in methods.items()}
        for g, rs in groups(test).items()
    }
    # the shipped head against Neural Cleanse at its largest budget
    shown = ["MetaShield scan (fitted head)"] + [f"Neural Cleanse ({max(args.nc_steps)} steps)"] * bool(args.nc_steps)
    intervals = auroc_intervals(test, {m: methods[m] for m in shown})
    # the prior head has no text part: it cannot score text scans made without synthesis signals (AUROC None)
    auc_default = table["all"]["MetaShield scan (default head)"]["auroc"] or 0.0
    default_txt = _fmt(table["all"]["MetaShield scan (default head)"]["auroc"])
    auc_fitted = table["all"]["MetaShield scan (fitted head)"]["auroc"] or 0.0
    better = auc_fitted > auc_default
    if better and args.ship:
        shutil.copyfile(args.head_out, DEFAULT_SCAN_HEAD)
        shipped = f"the fitted head (held-out AUROC {auc_fitted:.3f} > default {default_txt}); copied to {DEFAULT_SCAN_HEAD.name}"
    elif better:
        shipped = f"nothing (the fitted head is better, {auc_fitted:.3f} > {default_txt}, but --ship was not given)"
    else:
        shipped = f"the prior default head kept (fitted head held-out AUROC {auc_fitted:.3f} <= default {default_txt})"
    meta = {
        "command": "python " + " ".join(a for a in sys.argv if a != "--report_only"),
        "zoo": f"{args.zoo} ({len(ids)} models; {len(train) - len(extra)} train / {len(test)} held-out scanned)",
        "split": (
            "each record's own (this report was rebuilt from the records alone, without the zoo)"
            if from_records
            else f"{args.split}; the {len(unsplit)} zoo models it does not list (the zoo's top-up after "
            "meta-training, and models a rebuild accepts that the split's build rejected: neither the detector nor "
            "the head saw them) "
            + ("are held out too" if args.unsplit == "test" else "are left out")
            + (f"; {len(head_train)} models of {args.head_train} train the head only" if head_train else "")
        )
        + (f"; {len(extra)} scans of other zoos in {', '.join(args.extra_train)} train the head too" if extra else ""),
        **(
            {
                "rescans": f"{rescanned[0]} records' MetaShield scans replaced by those of {', '.join(args.rescans)} "
                f"(the same synthesis signals: largest difference {rescanned[1]:.1e}); {rescanned[2]} of them were "
                "timed beside Neural Cleanse, whose records at those budgets they replace; the others keep the "
                "benchmark's Neural Cleanse records, with the stages their scans add timed at the benchmark run's pace"
            }
            if rescanned
            else {}
        ),
        "clean inputs": f"first {N_CLEAN} clean probe inputs per model, seed {SEED}",
        "synthesis steps": f"MetaShield {args.steps} (scan_model default {DEFAULT_STEPS})"
        + (
            f", screen and refine: every class {args.screen_steps} steps, then the {args.refine} classes with the "
            f"smallest triggers (at most K - 1) to {args.steps}"
            if args.refine
            else ", every class the full budget"
        )
        + "; Neural Cleanse (every class the full budget) "
        + " and ".join(str(s) for s in args.nc_steps)
        + (
            f" (records{' at ' + ', '.join(map(str, args.reuse_nc_budgets)) + ' steps' if args.reuse_nc_budgets else ''}"
            f" reused from {args.reuse_nc} where it has them; the rest ran in this run, right after the MetaShield scan"
            " of the same model in the same process)"
            if args.reuse_nc
            else " (each right after the MetaShield scan of the same model, in the same process)"
        ),
        **({"wall time of this invocation": f"{run_s:.0f} s for {len(todo)} newly scanned models"} if todo else {}),
        "scan head fit": f"fit_scan_head on the {len(train)} train models' signals: image/tensor models on "
        f"{list(SYNTHESIS_SIGNALS)} (C={args.head_c}), text models on {list(text_signals)} (C={args.text_head_c})"
        + (
            f", those whose search prefiltered a large vocabulary on {list(large_signals)} (same C)"
            if fitted.by_modality and f"text/{LARGE_VOCABULARY}" in fitted.by_modality
            else ""
        )
        + f" -> {args.head_out}",
        "verdict thresholds": (
            "per part, the score that flags "
            f"{args.target_fpr:.0%} of its train clean models by the same cross-validation as below (C as fitted; "
            f"--target_fpr {args.target_fpr:g}): "
            + ", ".join(f"{k} {v:.3f}" for k, v in thresholds.items())
            + "; the image/blend and image/source parts' come from scripts/scan_blend.py"
            if thresholds
            else "0.5 on the probability for the parts fit here (--target_fpr 0); the image/blend and image/source "
            "parts' from scripts/scan_blend.py"
        ),
        "scan seconds summed over all records": f"{sum(_total_s(r) for r in records):.0f} s",
        "head C by cross-validation on train models (mean AUROC per domain)": "; ".join(
            f"C={c}: " + ", ".join(f"{d} {a:.3f}" for d, a in aucs.items())
            for c, aucs in cv_head_c(train, text_signals, large_signals=large_signals).items()
        ),
        **text_signal_choice(train, text_signals, args.text_head_c, large_signals),
    }
    for r in test:  # strict JSON: no NaN
        if not np.isfinite(r["metashield"]["score_default_rescored"]):
            r["metashield"]["score_default_rescored"] = None
    summary = {
        "meta": meta,
        "methods": list(methods),
        "groups": table,
        "intervals": intervals,
        "heads": {"default (prior)": default_head.__dict__, "fitted": fitted.__dict__},
        "shipped": shipped,
        "records": records,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    out.with_suffix(".md").write_text(render(summary, meta))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
