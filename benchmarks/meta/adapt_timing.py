"""Wall time of `MetaShieldDetector.adapt` with 20 clean samples on zoo models (issue [3/6]: goal < 2 s on 2 CPU cores).

    python scripts/adapt_timing.py --zoo artifacts/zoo/standard --n 20 --out reports/adapt_timing.json
Times the full call as a user makes it (target forward passes on the raw clean inputs, ψ, inner loop, calibration)
on one model per (domain, family), after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from metashield_hf import load_detector
from metashield_hf.zoo import load_zoo, row_probe, row_to_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zoo", default="artifacts/zoo/standard")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--out", default="reports/adapt_timing.json")
    args = parser.parse_args()
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
