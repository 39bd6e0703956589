"""MNTD on the scan's train zoos: learned queries and a meta-classifier ([`QueryProbe`]), scored leave one attack out.

Every image / FL model of the given zoos is loaded once, with the same 20 clean probe inputs [`scan_model`] reads.
Each backdoor attack is one fold and the clean models are spread over the folds (seeded), so every model is scored
by a probe trained without its fold -- without its attack at all, for a backdoored model: the figure says how MNTD
would do on an attack it was not trained on, the scan's own blind-check question. ``--ship DIR`` then trains a probe
on every model with the same settings and saves it there (not part of the default scan).

    python benchmarks/scan/query_probe_zoo.py \
        --zoos artifacts/zoo/live_dev artifacts/zoo/fresh_cv artifacts/zoo/unseen_cv_2 artifacts/zoo/live_blind3 \
               artifacts/zoo/unseen_cv_3 \
        --records live_dev_agnostic.jsonl fresh_cv_agnostic.jsonl unseen_cv_2.jsonl live_blind3.jsonl unseen_cv_3.jsonl \
        --out benchmarks/scan/results/mntd_leave_attack_out

``--probe DIR --zoos Z --out O`` scores a check zoo's image models with a saved probe instead:

    python benchmarks/scan/query_probe_zoo.py --probe benchmarks/scan/results/mntd_probe \
        --zoos artifacts/zoo/unseen_cv_4 --out benchmarks/scan/results/mntd_unseen_cv_4

``--tune_queries false --out benchmarks/scan/results/mntd_fixed_queries_leave_attack_out`` gives MNTD's ablation: the
queries stay at their random start and only the classifier trains.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc
from metashield_hf.scan import QueryProbe, QueryProbeConfig, query_space, train_query_probe
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

N_CLEAN = 20  # scan_zoo.py's clean samples per scan
RECORDS = Path("benchmarks/scan/results/records")
ROW_COLUMNS = ["model_id", "domain", "attack", "is_backdoored"]


@dataclass
class Args:
    zoos: list[str] = field(default_factory=list, metadata={"help": "Zoo folders, one per records file."})
    records: list[str] = field(
        default_factory=list, metadata={"help": "Records files under results/records, one per zoo (optional)."}
    )
    out: str | None = field(default=None, metadata={"help": "Writes OUT.md and OUT.json (the out-of-fold figures)."})
    ship: str | None = field(default=None, metadata={"help": "Train a probe on every model and save it here."})
    leave_attack_out: bool = field(default=True, metadata={"help": "Score the models leave one attack out."})
    probe: str | None = field(
        default=None, metadata={"help": "Score the zoos' models with the probe saved here instead (a check zoo)."}
    )
    queries: int = field(default=QueryProbeConfig.queries)
    side: int = field(default=QueryProbeConfig.side)
    hidden: int = field(default=QueryProbeConfig.hidden)
    epochs: int = field(default=QueryProbeConfig.epochs)
    lr: float = field(default=QueryProbeConfig.lr)
    weight_decay: float = field(default=QueryProbeConfig.weight_decay)
    tune_queries: bool = field(default=QueryProbeConfig.tune_queries)
    seed: int = field(default=0)
    workdir: str = field(default="artifacts/scan_work", metadata={"help": "Where checkpoints are unpacked."})


def load_models(zoos: list[str], records: list[str], workdir: str):
    """(group, record, QuerySpace) for every image / FL model of the zoos that its records file lists; without
    records files, every image / FL model of the zoos (a check zoo; the record is then the zoo row's columns)."""
    out = []
    for z, zoo_dir in enumerate(zoos):
        zoo = load_zoo(zoo_dir)
        index = {m: i for i, m in enumerate(zoo["model_id"])}
        if records:
            path = RECORDS / records[z]
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            recs = [{k: zoo[i][k] for k in ROW_COLUMNS} for i in range(len(zoo))]
        group = records[z] if records else Path(zoo_dir).name
        for rec in tqdm(recs, desc=group, file=sys.stdout, mininterval=5):
            if rec["domain"] not in ("cv", "fl") or rec["model_id"] not in index:
                continue
            row = zoo[index[rec["model_id"]]]
            target = row_to_target(row, workdir)
            target.model.eval()
            for p in target.model.parameters():
                p.requires_grad_(False)
            space = query_space(target, row_probe(row)[0][:N_CLEAN])
            if space is not None:
                out.append((group, rec, space))
    return out


def per_attack_auroc(models, scores) -> tuple[dict[str, float], float, Counter]:
    """AUROC of each attack's models against every clean model, and of all backdoored models."""
    y = np.array([int(r["is_backdoored"]) for _, r, _ in models])
    attack = np.array([r["attack"] if r["is_backdoored"] else "none" for _, r, _ in models])
    scores = np.asarray(scores)
    clean = y == 0
    per = {a: auroc(scores[clean | (attack == a)], y[clean | (attack == a)]) for a in sorted(set(attack) - {"none"})}
    return per, auroc(scores, y), Counter(attack.tolist())


def write_results(out: str, summary: dict, lines: list[str]) -> None:
    """``OUT.json`` (the summary) and ``OUT.md`` (its table)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines))


def evaluate(models, args) -> int:
    """Score every model with the saved probe; write OUT.md / OUT.json (AUROC per attack, per-model scores)."""
    probe = QueryProbe.load(args.probe)
    scores, seconds = [], []
    for _, _, space in models:
        t = time.perf_counter()
        scores.append(probe.score(space))
        seconds.append(time.perf_counter() - t)
    per, overall, counts = per_attack_auroc(models, scores)
    summary = {
        "probe": args.probe,
        "zoos": args.zoos,
        "auroc": overall,
        "auroc_per_attack": per,
        "counts": dict(counts),
        "seconds_per_model": float(np.mean(seconds)),
        "scores": {r["model_id"]: s for (_, r, _), s in zip(models, scores, strict=True)},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "scores"}, indent=1))
    if args.out:
        n_bd = sum(v for k, v in counts.items() if k != "none")
        lines = [
            f"# MNTD probe `{args.probe}` on {', '.join(Path(z).name for z in args.zoos)}",
            "",
            "The saved probe's score of each image / FL model (its 20 clean probe inputs bound the queries); AUROC of",
            "each attack's models against every clean model.",
            "",
            "| attack | models | AUROC |",
            "|---|---:|---:|",
            *[f"| {a} | {counts[a]} | {v:.3f} |" for a, v in per.items()],
            f"| all ({n_bd} bd, {counts['none']} clean) | {len(models)} | {overall:.3f} |",
            "",
            f"Seconds per model (the queries' forward pass, one CPU thread): {summary['seconds_per_model']:.4f}.",
            "",
        ]
        write_results(args.out, summary, lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    models = load_models(args.zoos, args.records, args.workdir)
    print(f"{len(models)} models loaded in {time.perf_counter() - t0:.0f} s")
    if args.probe:
        return evaluate(models, args)
    config = QueryProbeConfig(
        queries=args.queries,
        side=args.side,
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        tune_queries=args.tune_queries,
        seed=args.seed,
    )
    y = np.array([int(r["is_backdoored"]) for _, r, _ in models])
    if args.leave_attack_out:
        leave_attack_out(models, y, config, args, t0)
    if args.ship:
        probe = train_query_probe([m[2] for m in models], [int(v) for v in y], config)
        probe.save(args.ship)
        print(f"probe -> {args.ship}")
    return 0


def leave_attack_out(models, y, config, args, t0) -> None:
    """Out-of-fold scores, one fold per attack; print and write OUT.md / OUT.json."""
    attack = [r["attack"] if r["is_backdoored"] else "none" for _, r, _ in models]
    attacks = sorted({a for a in attack if a != "none"})
    rng = np.random.default_rng(args.seed)
    clean_idx = rng.permutation([i for i, a in enumerate(attack) if a == "none"])
    fold = {i: attacks.index(a) for i, a in enumerate(attack) if a != "none"}
    fold |= {int(i): k % len(attacks) for k, i in enumerate(clean_idx)}
    oof = np.zeros(len(models))
    for f in tqdm(range(len(attacks)), desc="folds", file=sys.stdout):
        train = [i for i in range(len(models)) if fold[i] != f]
        probe = train_query_probe([models[i][2] for i in train], [int(y[i]) for i in train], config)
        for i in range(len(models)):
            if fold[i] == f:
                oof[i] = probe.score(models[i][2])
    clean = y == 0
    per_attack, overall, _ = per_attack_auroc(models, oof)
    summary = {
        "config": asdict(config),
        "models": len(models),
        "counts": dict(Counter(attack)),
        "oof_auroc": overall,
        "oof_auroc_per_attack": per_attack,
        "mean_over_attacks": float(np.mean(list(per_attack.values()))),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        lines = [
            "# MNTD (learned queries and a meta-classifier), leave one attack out on the scan's train zoos",
            "",
            f"{len(models)} image / FL models of {', '.join(args.records)}; each backdoor attack is one fold, the clean",
            "models spread over the folds; every model is scored by a probe trained without its fold.",
            f"Settings: {summary['config']}.",
            "",
            "| attack | models | out-of-fold AUROC against every clean model |",
            "|---|---:|---:|",
            *[f"| {a} | {summary['counts'][a]} | {v:.3f} |" for a, v in per_attack.items()],
            f"| mean over attacks | | {summary['mean_over_attacks']:.3f} |",
            f"| all ({int(y.sum())} bd, {int(clean.sum())} clean) | {len(models)} | {overall:.3f} |",
            "",
        ]
        write_results(args.out, summary, lines)


if __name__ == "__main__":
    raise SystemExit(main())
