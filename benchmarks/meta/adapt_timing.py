"""Wall time of `MetaShieldDetector.adapt` with 20 clean samples on zoo models (goal: < 2 s on 2 CPU cores).

    python benchmarks/meta/adapt_timing.py --zoo artifacts/zoo/standard --n 20

Times the full call as a user makes it (target forward passes on the raw clean inputs, ψ, inner loop, calibration)
on one model per (domain, family), after one warm-up call; writes ``results/adapt_timing.json``.
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


def time_adaptation(args: AdaptTimingArguments) -> list[dict]:
    """One record per (domain, family): the seconds of the second adapt() call on its first zoo model."""
    zoo = load_zoo(args.zoo)
    meta = zoo.select_columns(["domain", "family"])
    picks, seen = [], set()
    for i, (d, f) in enumerate(zip(meta["domain"], meta["family"], strict=True)):
        if (d, f) not in seen:
            seen.add((d, f))
            picks.append(i)
    detector = load_detector()
    results = []
    for i in picks:
        row = zoo[i]
        with tempfile.TemporaryDirectory() as work:
            target = row_to_target(row, work)
            clean, _, _ = row_probe(row)
            detector.adapt(target, clean[: args.n])  # warm-up (first forward passes allocate)
            t0 = time.perf_counter()
            shield = detector.adapt(target, clean[: args.n])
            seconds = time.perf_counter() - t0
        results.append({"model_id": row["model_id"], "domain": row["domain"], "family": row["family"],
                        "n": args.n, "adapt_steps": detector.config.adapt_steps, "seconds": round(seconds, 3),
                        "reference_seconds": round(shield.timings["reference_s"], 3)})  # fmt: skip
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
