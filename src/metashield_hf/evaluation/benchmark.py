"""``metashield evaluate``: run protocols on the activation cache and write JSON records, ``benchmark.md`` and PNGs."""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .protocols import ORDER, PROTOCOLS, Evaluation, parse_protocols, run_protocols

logger = logging.getLogger(__name__)


@dataclass
class EvaluateArguments:
    """Run evaluation protocols: ``metashield evaluate --protocol NAME[,NAME...]|all --zoo DIR --detector DIR --out DIR``.

    Protocols: in_domain, few_shot, cross_domain, novel_attacks, ablations, live_baselines, live, cost, adaptive (or
    all).
    """

    protocol: str = field(default="in_domain", metadata={"help": "Comma-separated protocol names, or 'all'."})
    detector: str = field(
        default="artifacts/meta/maml/detector",
        metadata={"help": "The meta-trained detector; its run folder's split.json fixes the held-out models."},
    )
    out: str = field(default="artifacts/eval/run", metadata={"help": "benchmark.md, PNG plots and summary.json."})
    zoo: str | None = field(default=None, metadata={"help": "Zoo folder (the cost protocol loads live models)."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Activation cache (default: <detector>/../../cache, as benchmarks/meta/run.sh)."},
    )
    split: str | None = field(default=None, metadata={"help": "split.json (default: <detector>/../split.json)."})
    live_detector: str | None = field(
        default=None,
        metadata={"help": "A detector reading live probes, scored by the live protocol (needs --zoo)."},
    )
    pooled: str | None = field(default=None, metadata={"help": "Pooled detector (default: sibling pooled/detector)."})
    oracle: str | None = field(default=None, metadata={"help": "Oracle-trained detector (default: sibling)."})
    prior: str | None = field(default=None, metadata={"help": "Untrained prior (default: sibling prior/)."})
    work_dir: str | None = field(
        default=None,
        metadata={"help": "Records (records/*.jsonl), per-protocol results, trained detectors (default: --out)."},
    )
    report_md: str | None = field(default=None, metadata={"help": "Also write the markdown here (links rewritten)."})
    seeds: int = field(default=5, metadata={"help": "Episode seeds 0..N-1 (mean ± std over seeds)."})
    k: str = field(default="10", metadata={"help": "Support sizes of the protocols other than few_shot."})
    few_shot_k: str = field(default="5,10,20,50", metadata={"help": "Support sizes of the few-shot curve."})
    steps: int = field(default=100, metadata={"help": "Outer steps of every detector a protocol trains."})
    adapt_steps: int | None = field(
        default=None, metadata={"help": "Inner steps at adaptation (default: detector's)."}
    )
    baselines: str = field(default="*", metadata={"help": "Baseline names or a wildcard (STRIP is always skipped)."})
    heldout_architectures: str = field(default="convnext,bert", metadata={"help": "in_domain's held-out archs."})
    bank_size: int = field(default=8, metadata={"help": "Banked training episodes per model."})
    cost_per_domain: int = field(default=2, metadata={"help": "Models per domain timed by the cost protocol."})
    adaptive_zoo: str | None = field(
        default=None,
        metadata={"help": "Zoo of adaptive attacks (benchmarks/input_detection/configs/adaptive_zoo.yaml)."},
    )
    merge: bool = field(
        default=True,
        metadata={"help": "Also report protocols an earlier run saved in the same --work_dir (results/<name>.json)."},
    )
    json: bool = field(default=False, metadata={"help": "Print the summary as JSON."})

    def __post_init__(self):
        self.protocols = parse_protocols(self.protocol)  # fails before anything is loaded
        if self.seeds < 1 or self.steps < 1:
            raise ValueError(f"--seeds and --steps must be >= 1, got {self.seeds} and {self.steps}")
        for name in ("k", "few_shot_k"):
            try:
                values = tuple(int(x) for x in getattr(self, name).split(","))
            except ValueError:
                raise ValueError(f"--{name} must be comma-separated integers, got {getattr(self, name)!r}") from None
            if min(values) < 3:
                raise ValueError(f"--{name}: support sizes must be >= 3, got {values}")
            setattr(self, f"{name}_tuple", values)


def _sibling(detector: Path, name: str, sub: str = "detector") -> str | None:
    path = detector.parent.parent / name / sub if sub else detector.parent.parent / name
    return str(path) if (path / "config.json").exists() else None


def build_evaluation(args: EvaluateArguments) -> Evaluation:
    """The [`Evaluation`] of a run: detectors, fixed split, cache."""
    from ..baselines import BASELINES

    det = Path(args.detector)
    if not (det / "config.json").exists():
        raise FileNotFoundError(f"--detector {det} has no config.json; pass a folder written by `metashield train`")
    split_path = Path(args.split or det.parent / "split.json")
    if not split_path.exists():
        raise FileNotFoundError(f"no split file {split_path}: pass --split (the split.json of the training run)")
    split = json.loads(split_path.read_text())
    detectors = {"metashield": str(det)}
    for name, given, default in (
        ("pooled", args.pooled, _sibling(det, "pooled")),
        ("oracle", args.oracle, _sibling(det, "oracle")),
        ("prior", args.prior, _sibling(det, "prior", "")),
        ("live", args.live_detector, None),
    ):
        if given or default:
            detectors[name] = given or default
    baselines = tuple(n for pattern in args.baselines.split(",") for n in BASELINES.list(pattern.strip()))
    if not baselines and args.baselines.strip():
        raise ValueError(f"--baselines {args.baselines!r} matches none of {BASELINES.list()}")
    return Evaluation(
        cache_dir=args.cache_dir or str(det.parent.parent / "cache"),
        train_ids=split["train"],
        test_ids=split["test"],
        detectors=detectors,
        out=args.work_dir or args.out,
        seeds=args.seeds,
        k=args.k_tuple,
        few_shot_k=args.few_shot_k_tuple,
        steps=args.steps,
        adapt_steps=args.adapt_steps,
        baselines=baselines,
        heldout_architectures=tuple(a for a in args.heldout_architectures.split(",") if a),
        bank_size=args.bank_size,
        zoo=args.zoo,
        cost_per_domain=args.cost_per_domain,
        adaptive_zoo=args.adaptive_zoo,
    )


def command_line(args: EvaluateArguments) -> str:
    """The ``metashield evaluate`` command that reproduces ``args`` (flags that differ from the defaults)."""
    defaults = EvaluateArguments()
    flags = [
        f"--{k} {shlex.quote(str(v))}" if not isinstance(v, bool) else f"--{k}"
        for k, v in asdict(args).items()
        if v != getattr(defaults, k) and k not in ("json", "merge")
    ]
    return " ".join(["metashield evaluate", *flags])


def run_evaluate(args: EvaluateArguments, command: str | None = None) -> dict:
    """The job behind ``metashield evaluate``; returns the summary (headline, heat-map, group transfer, paths)."""
    from .report import write_report

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ψ and the detector work on tiny tensors: extra threads only contend on a shared box
    try:
        ev = build_evaluation(args)
        results = run_protocols(ev, args.protocols)
    finally:
        torch.set_num_threads(threads)
    work, out = Path(args.work_dir or args.out), Path(args.out)
    (work / "results").mkdir(parents=True, exist_ok=True)
    command = command or command_line(args)
    for name, res in results.items():  # each protocol's records, so a later run can add protocols to the report
        res["command"] = command
        (work / "results" / f"{name}.json").write_text(json.dumps(res, default=str))
    if args.merge:
        for path in sorted((work / "results").glob("*.json")):
            if path.stem not in results and path.stem in PROTOCOLS:
                results[path.stem] = json.loads(path.read_text())
                logger.info("report includes %s from an earlier run (%s)", path.stem, path)
        results = {n: results[n] for n in sorted(results, key=lambda n: ORDER.index(n) if n in ORDER else 99)}
    records_path = work / "records" / f"{'+'.join(args.protocols)}.jsonl"  # one file per run: runs may overlap
    records_path.parent.mkdir(parents=True, exist_ok=True)
    with records_path.open("w") as f:
        for rec in ev.records.values():
            f.write(json.dumps(rec) + "\n")
    options = {k: v for k, v in asdict(args).items() if k not in ("json", "merge")}
    per_protocol = ", ".join(f"{n}: {r.get('seconds', 0):.0f} s" for n, r in results.items())
    commands = list(dict.fromkeys(r.get("command", command) for r in results.values()))
    facts = {
        "command": "; ".join(f"`{c}`" for c in commands),
        "models": f"{len(ev.all_ids)} zoo models from the fixed split ({len(ev.train_ids)} training / "
        f"{len(ev.test_ids)} held-out); models added to the cache later are ignored",
        "domains": ", ".join(f"{d}: {len(ev.ids_where(ev.all_ids, domain=d))}" for d in ev.domains()),
        "detectors": ", ".join(f"{n} = `{d}`" for n, d in ev.detectors.items()),
        "seeds": f"{ev.seeds} episode seeds; detectors trained by a protocol: {ev.steps} outer steps × 8 episodes "
        f"(second-order MAML, 3 inner steps, bank of {ev.bank_size} episodes per model), one training seed",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, 1 torch thread",
        "wall time": f"{time.perf_counter() - start:.0f} s this run; per protocol: {per_protocol}",
        "options": json.dumps(options),
        "notes": ev.notes,
        "k": list(ev.k),
    }
    summary = write_report(results, facts, out, [args.report_md] if args.report_md else [])
    summary["protocol_seconds"] = {n: r.get("seconds") for n, r in results.items()}
    summary["trained"] = ev.trained
    summary["timing"] = dict(ev.timing)
    if "cost" in results:
        summary["cost"] = results["cost"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return {"out": str(out), "records": str(records_path), "headline": summary.get("headline", {})}


def print_evaluate(result: dict) -> None:
    print(f"report: {result['out']}/benchmark.md; records: {result['records']}")
    for d, row in result["headline"].items():
        ms, b = row["metashield"], row["baseline"]
        print(
            f"  {d:>4}: MetaShield AUROC {ms['auroc'][0]:.3f} TPR@5%FPR {ms['tpr@5fpr'][0]:.3f} | "
            f"{row['best_baseline']} AUROC {b['auroc'][0]:.3f} TPR@5%FPR {b['tpr@5fpr'][0]:.3f}"
        )
