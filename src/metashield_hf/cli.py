"""``metashield`` command line: parses flags into dataclasses and dispatches to importable jobs."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, fields
from typing import ClassVar

from .arguments import run_command
from .scan.config import ScanConfig


@dataclass
class DetectArguments:
    """Flag inputs to a classifier. Without --target, runs the bundled backdoored digits example."""

    target: str | None = field(default=None, metadata={"help": "Hub id or folder of the classifier to protect."})
    clean_samples: str | None = field(
        default=None,
        metadata={"help": "Clean inputs: text file, image folder, CSV/JSONL/parquet, or dataset[:split[:column]]."},
    )
    inputs: str | None = field(default=None, metadata={"help": "Inputs to check (same formats as --clean_samples)."})
    detector: str | None = field(default=None, metadata={"help": "Detector folder or Hub id (default: embedded)."})
    n: int = field(default=20, metadata={"help": "Number of clean samples to use."})
    target_fpr: float = field(default=0.05, metadata={"help": "False-positive rate for the calibrated threshold."})
    adapt_steps: int | None = field(
        default=None, metadata={"help": "Deployable inner-loop steps at adaptation (default: the detector's own)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for everything random."})
    positives: str = field(
        default="auto",
        metadata={
            "help": "Inner-loop positives: auto (synthesized for image/tensor models, pseudo for text), pseudo "
            "(generic pseudo-anomalies) or synthesized (the scan's triggers)."
        },
    )
    scan_first: bool = field(
        default=False,
        metadata={"help": "Scan the target first and adapt with the scan's synthesized triggers (one synthesis)."},
    )
    erase: str = field(
        default="auto",
        metadata={
            "help": "The erase check of the synthesized trigger: auto (on unless erasing moves the clean samples; "
            "image/tensor models) or off."
        },
    )
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the target's own code to run."})
    allow_pickle: bool = field(
        default=False, metadata={"help": "Accept the target's pickle-only weights (only for files you trust)."}
    )
    progress: bool = field(
        default=True,
        metadata={"help": "Progress bars on stderr for the synthesis and the scan (--no_progress: none)."},
    )
    device: str | None = field(
        default=None,
        metadata={"help": "Where the target runs: cpu, cuda, cuda:N, mps, xpu (default: cuda if present, else cpu)."},
    )


def _adapt_for_detect(detector, target, clean, args: DetectArguments, **options):
    """``detector.adapt`` with the detect flags; with ``--scan_first`` the scan's report hands over its triggers."""
    kw = {"steps": args.adapt_steps, "target_fpr": args.target_fpr, "seed": args.seed, "erase": args.erase, **options}
    kw["device"] = args.device
    if not args.scan_first:
        synthesis = ScanConfig(progress=args.progress)
        return None, detector.adapt(target, clean, positives=args.positives, synthesis=synthesis, **kw)
    from .shield import adapt_after_scan

    return adapt_after_scan(detector, target, clean, scan_config=ScanConfig(progress=args.progress), **kw)


def _shield_summary(shield, report) -> dict:
    """What the detect output says about the adaptation: the positives used, the erase check and the threshold's
    expected FPR."""
    found = shield.positives
    erase = f"on (class {shield.erase.target_class})" if shield.erase is not None else f"off ({shield.erase_note})"
    return {
        "positives": f"{found.source} (classes {found.classes})" if found and found.outputs is not None else "pseudo",
        "erase_check": erase,
        "expected_fpr": {k: round(float(v), 4) for k, v in shield.fpr_estimate.items() if k in ("mean", "p90")},
        **({"scan": {"verdict": report.verdict, "score": round(report.score, 4)}} if report is not None else {}),
    }


def run_detect(args: DetectArguments) -> dict:
    """The job behind ``metashield detect``; returns the printed result as a dict."""
    import numpy as np

    from .evaluation.metrics import auroc, rates
    from .loading import load_detector
    from .samples import load_samples

    detector = load_detector(args.detector)
    if args.target is None:
        from .zoo.examples import digits_badnets_example

        ex = digits_badnets_example(seed=args.seed)
        g = np.random.default_rng(args.seed)
        clean = ex.clean_pool[g.permutation(len(ex.clean_pool))[: args.n]]
        report, shield = _adapt_for_detect(detector, ex.model, clean, args)
        s_clean, s_trig = shield.score(ex.test_clean), shield.score(ex.test_triggered)
        scores = np.concatenate([s_clean, s_trig])
        labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_trig))]
        return {
            "example": "digits + BadNets 2x2 patch (bundled)",
            "target_label": ex.target_label,
            "model_clean_accuracy": round(ex.clean_accuracy, 4),
            "model_attack_success_rate": round(ex.attack_success_rate, 4),
            "n_clean_samples": len(clean),
            "threshold": round(shield.threshold, 4),
            "held_out_clean": {"n": len(s_clean), "mean_score": round(float(s_clean.mean()), 4)},
            "triggered": {"n": len(s_trig), "mean_score": round(float(s_trig.mean()), 4)},
            **{k: round(v, 4) for k, v in rates(scores, labels, shield.threshold).items()},
            "auroc": round(auroc(scores, labels), 4),
            "adapt_seconds": round(shield.timings["adapt_s"], 3),
            **_shield_summary(shield, report),
        }
    if args.clean_samples is None or args.inputs is None:
        raise ValueError("--target needs --clean_samples and --inputs")
    clean = load_samples(args.clean_samples, args.n, seed=args.seed)
    report, shield = _adapt_for_detect(
        detector, args.target, clean, args, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle
    )
    inputs = load_samples(args.inputs)
    rows = shield.predict(inputs)
    for row, item in zip(rows, inputs, strict=True):
        row["input"] = item if isinstance(item, str) else f"<{type(item).__name__}>"
    return {"threshold": shield.threshold, **_shield_summary(shield, report), "results": rows}


def _print_detect(result: dict) -> None:
    fpr = result["expected_fpr"]
    adaptation = (
        f"positives: {result['positives']}; erase check: {result['erase_check']}; expected FPR at the threshold "
        f"{fpr['mean']:.3f} "
        f"(90th percentile over draws of the clean samples {fpr['p90']:.3f})"
    )
    if "scan" in result:
        adaptation = f"scan first: {result['scan']['verdict']} (score {result['scan']['score']:.3f}); " + adaptation
    if "results" in result:
        print(f"threshold {result['threshold']:.4f}")
        print(adaptation)
        print(f"{'label':<11} {'score':>7} {'class':>5}  input")
        for r in result["results"]:
            print(f"{r['label']:<11} {r['score']:>7.4f} {r['predicted_class']:>5}  {str(r['input'])[:80]}")
        return
    print(f"MetaShield on the {result['example']}")
    print(
        f"  target model: clean accuracy {result['model_clean_accuracy']:.3f}, "
        f"attack success rate {result['model_attack_success_rate']:.3f} (target class {result['target_label']})"
    )
    print(
        f"  adapted with {result['n_clean_samples']} clean samples in {result['adapt_seconds']:.2f} s; "
        f"threshold {result['threshold']:.4f}"
    )
    print(f"  {adaptation}")
    print(f"  {'inputs':<16} {'n':>5} {'mean score':>11} {'flagged':>8}")
    print(
        f"  {'held-out clean':<16} {result['held_out_clean']['n']:>5} {result['held_out_clean']['mean_score']:>11.4f} "
        f"{result['fpr']:>8.3f}"
    )
    print(
        f"  {'triggered':<16} {result['triggered']['n']:>5} {result['triggered']['mean_score']:>11.4f} "
        f"{result['tpr']:>8.3f}"
    )
    print(f"  TPR {result['tpr']:.3f}  FPR {result['fpr']:.3f}  AUROC {result['auroc']:.3f}")


@dataclass
class ScanArguments(ScanConfig):
    """Scan a checkpoint for a backdoor: ``metashield scan CHECKPOINT --clean-samples SPEC``. Exit code 0 = clean,
    1 = backdoored, 2 = error. Many at once: ``--from_file FILE`` or ``--hf_cache`` with ``--out FOLDER`` (exit code
    2 if a row failed, else 1 if one is backdoored, else 0). Every [`ScanConfig`] option is a flag."""

    positional: ClassVar[tuple[str, ...]] = ("checkpoint",)

    n: int | None = field(default=20, metadata={"help": "Number of clean samples to use (at least 5)."})
    refine: int | None = field(
        default=None,
        metadata={"help": "Opt-in speed-up: classes that continue to the full --steps after a short screen of all "
                  "classes (0 or none, the default: every class runs the full budget)."},
    )  # fmt: skip
    head: str | None = field(
        default=None,
        metadata={
            "help": "JSON of a refit model-level head (ScanHead.save); default: the shipped one.",
            "aliases": ["--scan-head", "--scan_head"],
        },
    )
    checkpoint: str | None = field(
        default=None, metadata={"help": "Hub id or folder of the classifier (transformers, timm, PEFT adapter)."}
    )
    clean_samples: str | None = field(
        default=None,
        metadata={"help": "Clean inputs: text file, image folder, CSV/JSONL/parquet, or dataset[:split[:column]]."},
    )
    detector: str | None = field(default=None, metadata={"help": "Detector folder or Hub id (default: embedded)."})
    neural_cleanse: bool = field(default=False, metadata={"help": "Also run the Neural Cleanse baseline."})
    json: bool = field(default=False, metadata={"help": "Print the report as JSON instead of text."})
    report: str | None = field(
        default=None,
        metadata={"help": "Folder for the pictures: each class's trigger and the evidence chart as PNGs, index.html."},
    )
    progress: bool = field(
        default=True, metadata={"help": "Progress bars on stderr naming each stage (--no_progress: none)."}
    )
    from_file: str | None = field(
        default=None,
        metadata={
            "help": "Batch: scan every checkpoint listed in this text file (one Hub id, id@revision or folder a line) "
            "into the --out table."
        },
    )
    hf_cache: bool = field(
        default=False,
        metadata={
            "help": "Batch: scan every classifier in the local Hugging Face cache (HF_HUB_CACHE or --cache_dir), each "
            "cached commit, into the --out table."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "The Hugging Face hub cache Hub ids resolve through (default: HF_HUB_CACHE)."},
    )
    out: str | None = field(
        default=None,
        metadata={
            "help": "Batch: folder of the parquet table (one row per checkpoint) and its dataset card; a rerun skips "
            "the rows already there. Exit code 2 if a row failed, else 1 if one is backdoored, else 0."
        },
    )

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as err:  # name the flag: "--blend_steps must be >= 0"
            raise ValueError(f"--{err}") from None

    def scan_config(self) -> ScanConfig:
        """The [`ScanConfig`] these flags set (``--refine 0`` means no refine)."""
        options = {f.name: getattr(self, f.name) for f in fields(ScanConfig)}
        return ScanConfig(**options | {"refine": self.refine or None})


def _clean_texts(args: ScanArguments) -> list:
    """The clean samples of a text scan, as the scan read them (for the report's pictures)."""
    from .samples import load_samples

    return load_samples(args.clean_samples, args.n, seed=args.seed)


def run_scan(args: ScanArguments) -> dict:
    """The job behind ``metashield scan``; returns the report as a dict (``exit_code`` 1 when backdoored)."""
    from .scan import neural_cleanse_scan, scan_model

    if args.from_file or args.hf_cache:
        return run_batch_scan(args)
    if not args.checkpoint:
        raise ValueError("name the checkpoint to scan: metashield scan CHECKPOINT --clean-samples FILE")
    if not args.clean_samples:
        raise ValueError("--clean-samples is required (a text file, image folder, table or dataset[:split[:column]])")
    if args.n is not None and args.n < 5:
        raise ValueError(f"--n must be at least 5 clean samples, got {args.n}")
    if args.refine is not None and args.refine < 0:
        raise ValueError(f"--refine must be >= 0, got {args.refine}")
    scanned = scan_model(args.checkpoint, args.clean_samples, args.detector, args.scan_config())
    report = scanned.to_dict()
    if args.report:
        from .scan.pictures import write_html_report

        texts = scanned.space in ("tokens", "embeddings")  # the sentences a token trigger is shown in
        clean = _clean_texts(args) if texts else None
        report["report_dir"] = str(write_html_report(scanned, args.report, clean).parent)
    common = {"n": args.n, "steps": args.steps, "seed": args.seed}
    common |= {"allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code}
    common["device"] = args.device
    if args.neural_cleanse:
        report["neural_cleanse"] = neural_cleanse_scan(args.checkpoint, args.clean_samples, **common).to_dict()
    report["exit_code"] = 1 if report["verdict"] == "backdoored" else 0
    return report


def run_batch_scan(args: ScanArguments) -> dict | None:
    """``metashield scan --from_file FILE`` / ``--hf_cache``: [`scan_many`] into the ``--out`` table, sharded over the
    launcher's processes (``RANK`` / ``WORLD_SIZE``, as the zoo build); ``None`` on processes other than 0."""
    import os

    from .scan.batch import cached_classifiers, read_checkpoint_list, scan_many

    if args.from_file and args.hf_cache:
        raise ValueError("pass one of --from_file and --hf_cache, not both")
    if args.checkpoint:
        raise ValueError(f"a batch scan (--from_file / --hf_cache) takes no CHECKPOINT, got {args.checkpoint!r}")
    if not args.out:
        raise ValueError("a batch scan needs --out FOLDER for its table (a rerun with the same --out resumes)")
    if not args.clean_samples:
        raise ValueError("--clean-samples is required (a text file, image folder, table or dataset[:split[:column]])")
    if args.neural_cleanse or args.report:
        raise ValueError("--neural_cleanse and --report scan one checkpoint; drop them for a batch scan")
    if args.n is not None and args.n < 5:
        raise ValueError(f"--n must be at least 5 clean samples, got {args.n}")
    import torch
    import torch.distributed as dist

    config = args.scan_config()
    # the launcher's shard (accelerate launch / torchrun set RANK and WORLD_SIZE), or an initialized process group's
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.set_num_threads(1)  # the processes share the cores
        if config.device is None and torch.cuda.is_available():  # one GPU per process, as far as they go
            local = int(os.environ.get("LOCAL_RANK", rank))
            config = config.replace(device=f"cuda:{local % torch.cuda.device_count()}")
    if args.from_file:
        checkpoints = read_checkpoint_list(args.from_file)
    else:
        checkpoints = cached_classifiers(args.cache_dir)
        if not checkpoints:
            from huggingface_hub import constants

            raise ValueError(f"no classifier in the Hugging Face cache {args.cache_dir or constants.HF_HUB_CACHE}")
    result = scan_many(
        checkpoints,
        args.clean_samples,
        args.out,
        config,
        detector=args.detector,
        cache_dir=args.cache_dir,
        process_index=rank,
        num_processes=world,
    )
    if result.table is None:  # not process 0: process 0 merges and prints
        return None
    return {
        "out": str(result.out_dir),
        "table": str(result.table),
        "scanned": len(result.scanned),
        "skipped": len(result.skipped),
        "rows": result.rows,
        "exit_code": result.exit_code,
    }


def _print_batch(result: dict) -> None:
    rows = result["rows"]
    print(
        f"scanned {result['scanned']}, skipped {result['skipped']} (already in the table); {len(rows)} checkpoints: "
        f"{sum(r['verdict'] == 'backdoored' for r in rows)} backdoored, {sum(bool(r['error']) for r in rows)} failed"
    )
    print(f"  {'checkpoint':<40} {'revision':<12} {'verdict':<10} {'score':>6} {'target':>6} {'seconds':>8}")
    for r in rows:
        verdict = "ERROR" if r["error"] else r["verdict"]
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        target = "-" if r["target"] is None else str(r["target"])
        print(
            f"  {r['id'][-40:]:<40} {(r['revision'] or '-')[:12]:<12} {verdict:<10} {score:>6} {target:>6} "
            f"{r['seconds']:>8.1f}" + (f"  {r['error']}" if r["error"] else "")
        )
    print(f"  table: {result['table']} (datasets.load_dataset({result['out']!r}))")


def _print_scan(report: dict) -> None:
    if "rows" in report:
        _print_batch(report)
        return
    print(
        f"{report['checkpoint']}: {report['verdict'].upper()} (score {report['score']:.3f}, threshold "
        f"{report['threshold']:.2f})"
    )

    def num(x, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    print(
        f"  suspected target class {report['suspected_target']} ({report['suspected_target_label']}), anomaly index "
        f"{num(report['anomaly_index'], '.2f')}; {report['n_clean_samples']} clean samples, triggers synthesized in "
        f"the {report['space']} space in {report['timings']['total_s']:.1f} s"
    )
    tokens = any(c.get("token_trigger") is not None for c in report["per_class"])
    print(
        f"  {'class':>5} {'label':<12} {'trigger size':>12} {'flip rate':>9} {'anomaly':>8} {'detector':>8}"
        + ("  token trigger (class prob.)" if tokens else "")
    )
    for c in report["per_class"]:
        mark = " <" if c["class_index"] == report["suspected_target"] else ""
        trig = f"  {c['token_trigger']!r} ({c['token_target_probs'][-1]:.2f})" if tokens else ""
        print(
            f"  {c['class_index']:>5} {str(c['label'])[:12]:<12} {num(c['trigger_size'], '.4f'):>12} "
            f"{c['flip_rate']:>9.2f} {num(c['anomaly_index'], '.2f'):>8} {num(c['detector_score'], '.3f'):>8}"
            f"{trig}{mark}"
        )
    if report.get("report_dir"):
        print(f"  pictures and the HTML report: {report['report_dir']}/index.html")
    nc = report.get("neural_cleanse")
    if nc:
        print(
            f"  Neural Cleanse: {nc['verdict']} (anomaly index {nc['anomaly_index']:.2f}, threshold "
            f"{nc['threshold']:.1f}, suspected target {nc['suspected_target']})"
        )


def _zoo_build():
    from .zoo.cli_zoo import ZooBuildArguments, print_zoo_build, run_zoo_build

    return ZooBuildArguments, run_zoo_build, print_zoo_build


def _zoo_push():
    from .zoo.cli_zoo import ZooPushArguments, run_zoo_push

    return ZooPushArguments, run_zoo_push, lambda r: print(json.dumps(r, indent=2, default=str))


def _train():
    from .meta.train import MetaTrainArguments, print_train, run_train

    return MetaTrainArguments, run_train, print_train


def _evaluate():
    from .evaluation.benchmark import EvaluateArguments, print_evaluate, run_evaluate

    return EvaluateArguments, run_evaluate, print_evaluate


# Lazy: each command imports its job only when it runs (importing torch + transformers alone costs seconds).
COMMANDS = {
    "detect": lambda: (DetectArguments, run_detect, _print_detect),
    "zoo build": _zoo_build,
    "zoo push": _zoo_push,
    "train": _train,
    "scan": lambda: (ScanArguments, run_scan, _print_scan),
    "evaluate": _evaluate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns 0 on success, 2 on bad input (and 1 where a command reports a finding)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
    if name not in COMMANDS:
        from .arguments import EXIT_CODES

        stream = sys.stdout if argv and argv[0] in {"-h", "--help"} else sys.stderr
        print(f"usage: metashield {{{' | '.join(COMMANDS)}}} [--help] ...\n{EXIT_CODES}", file=stream)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cls, job, show = COMMANDS[name]()
    return run_command(name, cls, job, show, argv[len(name.split()) :])


if __name__ == "__main__":
    sys.exit(main())
