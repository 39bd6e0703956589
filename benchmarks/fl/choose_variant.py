"""Apply the calibrated screen's selection rule (benchmarks/fl/README.md, "Calibrated screen: the rule") to a result
file of ``run.py``: which evidence variant (``margin``, ``drift``, ``margin+drift``, centred on the round or, ``-nr``, on the candidate
only) becomes the default.

    python benchmarks/fl/choose_variant.py benchmarks/fl/results/screening_calibrated.json --datasets mnist

Reads only the settings of ``--datasets`` (the training side); prints every variant's numbers and the winner.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = ("margin", "drift", "margin+drift", "margin-nr", "drift-nr", "margin+drift-nr")
SIGNALS = {v: 1 + ("+" in v) for v in VARIANTS}
MAX_FPR = 0.15
PLANTED_ASR = 0.10
TIE = 0.05


def summarise(result: dict, datasets: list[str]) -> dict[str, dict]:
    out = {}
    settings = [s for s in result["settings"] if s["dataset"] in datasets]
    for v in VARIANTS:
        key = f"calibrated:{v}"
        fp = tn = 0
        planted, every = [], []
        for s in settings:
            for name, r in s["attacks"].items():
                d = r["detection"][key]
                fp, tn = fp + d["fp"], tn + d["tn"]
                every.append(d["tpr"])
                if r["outcome"]["none"]["asr"] > PLANTED_ASR:
                    planted.append((f"{s['dataset']}/{s['algorithm']}/{name}", d["tpr"]))
        out[v] = {
            "pooled_fpr": fp / (fp + tn) if fp + tn else float("nan"),
            "min_planted_tpr": min((t for _, t in planted), default=float("nan")),
            "mean_tpr": sum(every) / len(every) if every else float("nan"),
            "planted_rows": planted,
        }
    return out


def choose(summary: dict[str, dict]) -> str | None:
    """The rule: FPR gate, then min planted TPR (ties within 0.05), mean TPR, pooled FPR, fewer signals."""
    alive = [v for v in VARIANTS if summary[v]["pooled_fpr"] <= MAX_FPR]
    if not alive:
        return None
    best = max(summary[v]["min_planted_tpr"] for v in alive)
    alive = [v for v in alive if summary[v]["min_planted_tpr"] >= best - TIE]
    alive.sort(key=lambda v: (-summary[v]["mean_tpr"], summary[v]["pooled_fpr"], SIGNALS[v]))
    return alive[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--datasets", nargs="+", default=["mnist"])
    args = parser.parse_args(argv)
    summary = summarise(json.loads(args.result.read_text()), args.datasets)
    print("| variant | pooled benign FPR | min TPR (planted rows) | mean TPR (all rows) |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        s = summary[v]
        print(f"| {v} | {s['pooled_fpr']:.3f} | {s['min_planted_tpr']:.2f} | {s['mean_tpr']:.2f} |")
    print("planted rows:", [name for name, _ in summary[VARIANTS[0]]["planted_rows"]])
    print("chosen:", choose(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
