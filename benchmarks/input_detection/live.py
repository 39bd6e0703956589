"""Input-level detection with live evidence: build live episodes, meta-train the detector variants, score every method.

Steps (each resumable; generated files under ``--work``, git-ignored):

1. ``bank``: live episodes of every model of ``--zoo`` (`metashield_hf.evaluation.live`): training models at
   k in {5, 10, 20} x 4 seeds (no baselines), held-out models at ``--k`` x ``--seeds`` with every baseline.
2. ``train``: second-order MAML (`metashield_hf.meta.train`, the settings of ``benchmarks/meta/run.sh``) of the
   variants: ``live`` (ψ + every probe: metashield-base v2), ``one_pass`` (ψ only, same episodes), and one ablation
   per probe dropped.
3. ``evaluate``: every variant, the shipped detector and every baseline on the held-out episodes -> TPR@5%FPR, AUROC,
   the FPR at the detector's own calibrated threshold, forward passes per input; ``--out`` gets ``.json`` and ``.md``.

``--detectors NAME=FOLDER`` evaluates frozen detectors instead of training (the blind check: a zoo none of them saw).

``--positives pseudo,synthesized,auto,oracle`` (issue [3/5]) also stores each episode's synthesized positives (the
scan's synthesis on the support, `metashield_hf.scan.positives`) and oracle positives, meta-trains the one-pass variant once
per kind of positives (as deployed: the inner loop of training sees what adaptation will see), and scores every
detector with each kind; ``--no_live_probes`` and ``--no_baselines`` skip what that study does not read.

    python benchmarks/input_detection/live.py --zoo artifacts/zoo/live_dev --work artifacts/live/positives \
        --out benchmarks/input_detection/results/synthesized_positives/meta_trained_live_dev \
        --split benchmarks/input_detection/results/live_evidence/dev_split.json \
        --positives pseudo,synthesized,auto,oracle --variants one_pass --no_live_probes --no_baselines \
        --train_seeds 2 --seeds 3 --threads 1

    python benchmarks/input_detection/live.py --zoo artifacts/zoo/live_dev --work artifacts/live/dev \
        --out benchmarks/input_detection/results/live_evidence/dev_held_out
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf import MetaShieldDetector
from metashield_hf.evaluation.live import (
    EPISODE_POSITIVES,
    LIVE_EPISODE_BASELINES,
    detector_columns,
    episode_from_live,
    live_episode,
    live_episode_path,
    load_live_episode,
    score_live_episode,
)
from metashield_hf.evaluation.metrics import auroc, tpr_at_fpr
from metashield_hf.loading import DEFAULT_DETECTOR_DIR
from metashield_hf.meta.split import split_models
from metashield_hf.meta.train import MetaTrainArguments, train
from metashield_hf.probes import DEFAULT_PROBES, PROBES
from metashield_hf.scan import ScanConfig, positives_for
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

logger = logging.getLogger("live")
TRAIN_K, TRAIN_SEEDS = (5, 10, 20), (100, 101, 102, 103)
# Forward passes per input beyond the ordinary one, as the methods are configured here (the probes' are measured).
BASELINE_PASSES = {"strip": 20, "scale_up": 5, "ibd_psc": 5, "ted": 0}


@dataclass
class LiveArguments:
    """Options of the live-evidence study."""

    zoo: str = field(metadata={"help": "The zoo folder (or Hub id) whose models are scored."})
    work: str = field(metadata={"help": "Folder of live episodes, the activation cache and trained detectors."})
    out: str = field(metadata={"help": "Results path without suffix (.json and .md are written)."})
    split: str | None = field(default=None, metadata={"help": "split.json to reuse (default: 30%% of each stratum)."})
    k: str = field(default="10,20", metadata={"help": "Support sizes of the held-out episodes."})
    seeds: int = field(default=5, metadata={"help": "Episode seeds per (model, k)."})
    steps: int = field(default=300, metadata={"help": "Outer MAML steps of each trained variant."})
    detectors: list[str] | None = field(
        default=None, metadata={"help": "NAME=FOLDER: evaluate these frozen detectors instead of training."}
    )
    variants: str = field(
        default="live,one_pass,ablations",
        metadata={"help": "Which detectors to train: live (v2), one_pass, ablations (one per probe dropped)."},
    )
    all_test: bool = field(default=False, metadata={"help": "Every model of the zoo is held out (a blind zoo)."})
    positives: str = field(
        default="pseudo",
        metadata={
            "help": "Inner-loop positives, comma-separated: pseudo, synthesized (the scan's synthesis), auto, oracle."
        },
    )
    no_live_probes: bool = field(default=False, metadata={"help": "Episodes without live probes (one-pass only)."})
    no_baselines: bool = field(default=False, metadata={"help": "Held-out episodes without the baselines."})
    train_seeds: int = field(default=len(TRAIN_SEEDS), metadata={"help": "Episode seeds per (training model, k)."})
    threads: int = field(default=2, metadata={"help": "torch threads."})


def build_bank(
    zoo, ids: set[str], folder: Path, plan: dict[str, list[tuple[int, int, bool]]], *, probes, synthesis, baselines
) -> None:
    names = zoo.select_columns(["model_id"])["model_id"]
    todo = [i for i, m in enumerate(names) if m in ids and any(
        not live_episode_path(folder, m, k, s).exists() for k, s, _ in plan[m])]  # fmt: skip
    for i in tqdm(todo, desc="live episodes (models)"):
        row = zoo[i]
        mid = row["model_id"]
        adapter = row_to_target(row, batch_size=256)
        clean, triggered, labels = row_probe(row)
        meta = {k: row[k] for k in ("model_id", "domain", "dataset", "architecture", "attack", "attack_params",
                                    "is_backdoored")}  # fmt: skip
        for k, seed, with_baselines in plan[mid]:
            path = live_episode_path(folder, mid, k, seed)
            if path.exists():
                continue
            ep = live_episode(adapter, clean, triggered, labels, meta, k, seed, probes=probes, synthesis=synthesis,
                              baselines=baselines if with_baselines else ())  # fmt: skip
            ep["meta"] = meta
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(ep, tmp)
            tmp.rename(path)


def train_variant(name, probes, args, work: Path, train_ids, bank_files, positives: str = "pseudo") -> Path:
    out = work / "detectors" / name
    if (out / "detector" / "config.json").exists():
        return out / "detector"
    targs = MetaTrainArguments(
        out=str(out), cache_dir=str(work / "cache"), split=str(work / "split.json"), steps=args.steps, meta_batch=8,
        k_choices="5,10,20", inner_steps=3, seed=0, probes=",".join(probes), num_threads=args.threads,
        resume=(out / "checkpoints").exists(),
    )  # fmt: skip
    episodes = {m: [load_live_episode(f) for f in files] for m, files in bank_files.items() if m in train_ids}
    first = next(iter(episodes.values()))[0]
    cols = detector_columns(first["feature_names"], probes)

    def source(tasks, rng: random.Random):
        task = rng.choice(tasks)
        return episode_from_live(rng.choice(episodes[task.model_id]), cols, positives)

    train(targs, episode_source=source)
    return out / "detector"


def probe_passes(probes: list[str], modality: str) -> int:
    """Extra forward passes per input of these probes (their defaults) on a model of this modality."""
    return sum(PROBES.get(p).default_passes for p in probes or [] if modality in PROBES.get(p).modalities)


def metrics(neg: np.ndarray, pos: np.ndarray) -> dict:
    s, y = np.r_[neg, pos], np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    return {"auroc": auroc(s, y), "tpr@5fpr": tpr_at_fpr(s, y, 0.05)}


def evaluate(
    test_files: dict[str, list[Path]], detectors: dict[str, Path], positives: dict[str, str] | None = None
) -> list[dict]:
    """Every detector (adapted with its ``positives[name]``, default pseudo) and every stored baseline on each
    held-out episode."""
    positives = positives or {}
    loaded = {n: MetaShieldDetector.from_pretrained(p).eval() for n, p in detectors.items()}
    records = []
    for mid, files in tqdm(sorted(test_files.items()), desc="evaluate (models)"):
        for f in files:
            ep = load_live_episode(f)
            meta, n_c = ep["meta"], int(ep["n_clean"])
            backdoored = bool(meta["is_backdoored"])
            base = {"model_id": mid, "domain": meta["domain"], "attack": meta["attack"], "k": int(ep["k"]),
                    "seed": int(ep["seed"]), "backdoored": backdoored}  # fmt: skip
            sec = ep["seconds"]
            for name, det in loaded.items():
                kind = positives.get(name, "pseudo")
                s, thr = score_live_episode(det, ep, positives=kind)
                t = sec["psi"] + sum(sec[f"probe/{p}"] for p in det.config.probes)
                if kind != "oracle" and positives_for(kind, ep["modality"]) == "synthesized":
                    t += sec.get("synthesis", 0.0)
                rec = {**base, "method": name, "passes": probe_passes(det.config.probes, ep["modality"]),
                       "fpr": float((s[:n_c] > thr).mean()), "cost": (sec["forward"] + t) / sec["forward"]}  # fmt: skip
                if backdoored and len(s) > n_c:
                    rec.update(metrics(s[:n_c], s[n_c:]), tpr=float((s[n_c:] > thr).mean()))
                records.append(rec)
            for name, sc in ep["scores"].items():
                s = sc.numpy()
                rec = {**base, "method": name, "passes": BASELINE_PASSES.get(name, 0),
                       "cost": (sec["forward"] + sec.get(name, 0.0)) / sec["forward"]}  # fmt: skip
                if backdoored and len(s) > n_c:
                    rec.update(metrics(s[:n_c], s[n_c:]))
                records.append(rec)
    return records


def summarise(records: list[dict]) -> dict:
    """method -> domain -> k -> metric -> (mean over seeds of the mean over models, std over seeds, n models)."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    keys = {(r["method"], d, r["k"]) for r in records for d in (r["domain"], "all")}
    for method, dom, k in sorted(keys):
        rows = [r for r in records if r["method"] == method and r["k"] == k and dom in (r["domain"], "all")]
        cell = {}
        for metric in ("tpr@5fpr", "auroc", "fpr", "tpr"):
            per_seed = defaultdict(list)
            for r in rows:
                if r.get(metric) is not None:
                    per_seed[r["seed"]].append(r[metric])
            if per_seed:
                means = [np.mean(v) for v in per_seed.values()]
                cell[metric] = (float(np.mean(means)), float(np.std(means)),
                                len({r["model_id"] for r in rows if r.get(metric) is not None}))  # fmt: skip
        cell["passes"] = float(np.mean([r["passes"] for r in rows]))
        cell["cost"] = float(np.median([r["cost"] for r in rows]))
        out[method][dom][k] = cell
    return out


def render(summary: dict, facts: dict) -> str:
    lines = [f"# {facts['title']}", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items() if k != "title"]
    methods = list(summary)
    doms = sorted({d for m in summary.values() for d in m}, key=lambda d: (d == "all", d))
    ks = sorted({k for m in summary.values() for d in m.values() for k in d})
    for k in ks:
        lines += ["", f"## k = {k}: TPR@5%FPR / AUROC (mean ± std over seeds; n = backdoored models)", ""]
        lines += [
            "| method | extra passes | cost | " + " | ".join(doms) + " |",
            "|---|---:|---:|" + "---|" * len(doms),
        ]
        for m in methods:
            cells = []
            for d in doms:
                c = summary[m].get(d, {}).get(k, {})
                if "tpr@5fpr" in c:
                    t, a = c["tpr@5fpr"], c["auroc"]
                    cells.append(f"{t[0]:.3f} ± {t[1]:.3f} / {a[0]:.3f} (n={t[2]})")
                else:
                    cells.append("—")
            allk = summary[m].get("all", {}).get(k, {})
            lines.append(
                f"| {m} | {allk.get('passes', 0):.1f} | {allk.get('cost', 0):.1f}x | " + " | ".join(cells) + " |"
            )
        lines += ["", f"## k = {k}: the detectors' own threshold (target FPR 0.05): FPR on clean inputs / TPR", ""]
        lines += ["| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for m in methods:
            if "fpr" not in summary[m].get("all", {}).get(k, {}):
                continue
            cells = []
            for d in doms:
                c = summary[m].get(d, {}).get(k, {})
                f, t = c.get("fpr"), c.get("tpr")
                cells.append(f"{f[0]:.3f} / {t[0]:.3f}" if f and t else (f"{f[0]:.3f} / —" if f else "—"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(LiveArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    zoo = load_zoo(args.zoo)
    cols = ["model_id", "domain", "dataset", "architecture", "attack", "attack_params", "is_backdoored"]
    metas = zoo.select_columns(cols).to_list()
    ks = tuple(int(x) for x in args.k.split(","))
    if args.all_test:
        train_ids, test_ids = [], [m["model_id"] for m in metas]
    elif args.split:
        split = json.loads(Path(args.split).read_text())
        train_ids, test_ids = split["train"], split["test"]
    else:
        train_ids, test_ids = split_models(metas, test_fraction=0.3, seed=0)
    (work / "split.json").write_text(json.dumps({"train": sorted(train_ids), "test": sorted(test_ids)}, indent=1))
    plan = {m: [(k, s, False) for k in TRAIN_K for s in TRAIN_SEEDS[: args.train_seeds]] for m in train_ids}
    plan |= {m: [(k, s, True) for k in ks for s in range(args.seeds)] for m in test_ids}
    kinds = [p for p in args.positives.split(",") if p]
    unknown = sorted(set(kinds) - set(EPISODE_POSITIVES))
    if unknown:
        raise ValueError(f"--positives: unknown {unknown}; choose from {EPISODE_POSITIVES}")
    t0 = time.perf_counter()
    build_bank(zoo, set(plan), work / "episodes", plan, probes=() if args.no_live_probes else DEFAULT_PROBES,
               synthesis=ScanConfig() if {"synthesized", "auto"} & set(kinds) else None,
               baselines=() if args.no_baselines else LIVE_EPISODE_BASELINES)  # fmt: skip
    bank_seconds = time.perf_counter() - t0
    files = {m: [live_episode_path(work / "episodes", m, k, s) for k, s, _ in plan[m]] for m in plan}

    if args.detectors is None:
        from metashield_hf.meta.cache import cache_activations

        cache_activations(zoo, work / "cache")  # train() reads the split's tasks from it (one pass per model)
        wanted = set(args.variants.split(","))
        variants = {}
        if "live" in wanted:
            variants["metashield-v2 (live)"] = list(DEFAULT_PROBES)
        if "one_pass" in wanted:
            variants["one-pass (ψ only, retrained)"] = []
        if "ablations" in wanted:
            variants |= {f"v2 without {p}": [q for q in DEFAULT_PROBES if q != p] for p in DEFAULT_PROBES}
        if args.no_live_probes and any(variants.values()):
            raise ValueError("--no_live_probes: the episodes hold no live features; train --variants one_pass only")
        detectors, adapt_with = {}, {}
        for base_name, probes in variants.items():
            for kind in kinds:  # meta-trained as deployed: the training inner loop sees this kind of positives
                name = base_name if kind == "pseudo" else f"{base_name}, {kind} positives"
                slug = name.split(" ")[0] if name.startswith("metashield") else name.replace(" ", "_").replace("(", "")
                slug = "".join(c for c in slug if c.isalnum() or c in "-_")
                if name.startswith("metashield") and kind != "pseudo":
                    slug += f"_{kind}"
                detectors[name] = train_variant(slug, probes, args, work, set(train_ids), files, kind)
                adapt_with[name] = kind
        frozen = {"metashield-base v1 (shipped)": Path(os.path.relpath(DEFAULT_DETECTOR_DIR))}
    else:
        detectors, adapt_with = {}, {}
        frozen = {n: Path(p) for n, p in (d.split("=", 1) for d in args.detectors)}
    for name, path in frozen.items():  # frozen detectors: adapted with each kind of positives
        for kind in kinds:
            label = name if kind == "pseudo" else f"{name}, {kind} positives"
            detectors[label], adapt_with[label] = path, kind
    records = evaluate({m: files[m] for m in test_ids}, {n: Path(p) for n, p in detectors.items()}, adapt_with)
    summary = summarise(records)
    facts = {
        "title": f"Live evidence: held-out models of {Path(args.zoo).name}",
        "zoo": f"{args.zoo} ({len(metas)} models; {len(train_ids)} train, {len(test_ids)} held out)",
        "episodes": f"k in {list(ks)}, {args.seeds} seeds, 32 clean + up to 32 triggered query inputs",
        "detectors": {n: str(p) for n, p in detectors.items()},
        "command": "python benchmarks/input_detection/live.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "threads"),
        "bank_seconds": round(bank_seconds, 1),
        "columns": "extra passes: forward passes per input beyond the ordinary one (mean over models); cost: median "
        "wall time of scoring the query (ordinary pass + the method, support fitting included) over the ordinary "
        "pass alone, on this machine's CPU",
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"facts": facts, "summary": summary, "records": records}, indent=1))
    out.with_suffix(".md").write_text(render(summary, facts))
    print(render(summary, facts))


if __name__ == "__main__":
    main()
