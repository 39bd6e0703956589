"""Would another verdict-threshold rule fix the scan's accuracy? A development check, not a shipped choice.

The shipped head's image/agnostic part is refit on its train records (`configs/head.yaml`, the chosen signals at
C = 1); each rule picks a threshold from its out-of-fold scores (20 x 5-fold), which is then applied to a check zoo's
records scored by the shipped head.

    python benchmarks/scan/threshold_rules.py     # writes results/threshold_rules.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from transformers import HfArgumentParser

from metashield_hf.scan import AGNOSTIC, ScanHead, fpr_threshold, read_records, score_record
from metashield_hf.scan.head import part_cv_scores

HERE = Path(__file__).resolve().parent


@dataclass
class Args:
    check: str = field(default="unseen_cv_3.jsonl", metadata={"help": "The check zoo's records (under records/)."})
    out: str = field(default=str(HERE / "results" / "threshold_rules.md"), metadata={"help": "The table."})


def accuracy(threshold: float, scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((scores > threshold) == labels))


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    records = HERE / "results" / "records"
    spec = yaml.safe_load((HERE / "configs" / "head.yaml").read_text())["parts"][AGNOSTIC]
    head = ScanHead.load()
    part = head.by_modality[f"image/{AGNOSTIC}"]
    signals = tuple(n for n, w in part["weights"].items() if w)
    rows = [r for f in spec["extra_train"] for r in read_records(records / f)]
    y = np.array([bool(r["is_backdoored"]) for r in rows])
    runs = part_cv_scores(rows, signals, 1.0)
    pooled, y_pooled = np.concatenate(runs), np.tile(y, len(runs))
    test = read_records(records / args.check)
    y_test = np.array([bool(r["is_backdoored"]) for r in test])
    s_test = np.array([score_record(head, r) for r in test])
    grid = np.unique(pooled)
    rules = {f"{f:.0%} FPR": fpr_threshold(runs, ~y, f) for f in (0.05, 0.10, 0.15)}
    rules["best accuracy"] = max(grid, key=lambda t: accuracy(t, pooled, y_pooled))
    rules["best balanced accuracy"] = max(
        grid, key=lambda t: np.mean(pooled[y_pooled] > t) + np.mean(pooled[~y_pooled] <= t)
    )
    lines = [
        f"# Verdict-threshold rules: {len(rows)} train models (out of fold) -> {args.check} (shipped head's scores)",
        "",
        "Written by `python benchmarks/scan/threshold_rules.py`. Development: the check zoo's blind figures were "
        "written down before this ran.",
        "",
        "| rule | threshold | train accuracy | train FPR | check accuracy | check FPR | check TPR |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in rules.items():
        lines.append(
            f"| {name} | {t:.3f} | {accuracy(t, pooled, y_pooled):.3f} | {np.mean(pooled[~y_pooled] > t):.3f} | "
            f"{accuracy(t, s_test, y_test):.3f} | {np.mean(s_test[~y_test] > t):.3f} | {np.mean(s_test[y_test] > t):.3f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
