"""Would another verdict-threshold rule fix the scan's accuracy? A development check, not a shipped choice.

Every part of the shipped head is refit out of fold on its own train records (`configs/head.yaml`; 20 x 5-fold): the
image head and the text parts as `fit_heads` fits them, the image/agnostic part on its signals at ``--agnostic_c``
(the C its rule chose). For each part, each rule picks a threshold from those out-of-fold scores: a share of the clean
train models flagged (5-20%), or the best train accuracy. The table gives each rule's train accuracy, and for the
agnostic part also the accuracy of that threshold on a check zoo's records scored by the shipped head.

    python benchmarks/scan/threshold_rules.py     # writes results/threshold_rules.md
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from transformers import HfArgumentParser

from metashield_hf.scan import AGNOSTIC, ScanHead, fpr_threshold, read_records, score_record
from metashield_hf.scan.head import out_of_fold_scores, part_cv_scores, record_modality, record_variant

HERE = Path(__file__).resolve().parent
FPRS = (0.05, 0.10, 0.15, 0.20)


@dataclass
class Args:
    check: str = field(default="unseen_cv_5.jsonl", metadata={"help": "A check zoo's records (under records/)."})
    agnostic_c: float = field(default=0.1, metadata={"help": "The image/agnostic part's C (results/head_fit.md)."})
    out: str = field(default=str(HERE / "results" / "threshold_rules.md"), metadata={"help": "The table."})


def accuracy(threshold: float, scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((scores > threshold) == labels))


def rules(runs: list[np.ndarray], y: np.ndarray) -> dict[str, float]:
    """Each rule's threshold from out-of-fold ``runs`` (one score array per repeat) of rows labelled ``y``."""
    pooled, y_pooled = np.concatenate(runs), np.tile(y, len(runs))
    out = {f"{f:.0%} FPR": fpr_threshold(runs, ~y, f) for f in FPRS}
    out["best accuracy"] = max(np.unique(pooled), key=lambda t: accuracy(t, pooled, y_pooled))
    return out


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    records = HERE / "results" / "records"
    spec = yaml.safe_load((HERE / "configs" / "head.yaml").read_text())
    head = ScanHead.load()
    parts: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}

    base = spec["base"]
    train = [r for r in read_records(records / base["standard"]) if r["split"] == "train"]
    train += [r for name in base["extra_train"] for r in read_records(records / name)]
    runs = out_of_fold_scores(
        train, base["c"], tuple(base["text_signals"]), base["text_c"], tuple(base["large_vocabulary_signals"])
    )
    keys = np.array(
        [str(head.part_key(record_modality(r), r["metashield"]["signals"], record_variant(r))) for r in train]
    )
    y = np.array([bool(r["is_backdoored"]) for r in train])
    for key in dict.fromkeys(keys):
        m = keys == key
        parts["image head" if key == "None" else key] = ([run[m] for run in runs], y[m])

    agnostic = head.by_modality[f"image/{AGNOSTIC}"]
    rows = [r for f in spec["parts"][AGNOSTIC]["extra_train"] for r in read_records(records / f)]
    y_agn = np.array([bool(r["is_backdoored"]) for r in rows])
    signals = tuple(n for n, w in agnostic["weights"].items() if w)
    parts[f"image/{AGNOSTIC}"] = (part_cv_scores(rows, signals, args.agnostic_c), y_agn)

    test = read_records(records / args.check)
    y_test = np.array([bool(r["is_backdoored"]) for r in test])
    s_test = np.array([score_record(head, r) for r in test])
    lines = [
        f"# Verdict-threshold rules per part: train models out of fold; `{args.check}` for the agnostic part",
        "",
        "Written by `python benchmarks/scan/threshold_rules.py`. Development: the check zoo's blind figures were "
        "written down before this ran; no rule here is shipped.",
        "",
        "| part (train models, bd) | rule | threshold | train accuracy | train FPR | check accuracy | check FPR | "
        "check TPR |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (part_runs, labels) in parts.items():
        pooled, y_pooled = np.concatenate(part_runs), np.tile(labels, len(part_runs))
        for rule, t in rules(part_runs, labels).items():
            check = ["–"] * 3
            if name == f"image/{AGNOSTIC}":
                check = [
                    f"{accuracy(t, s_test, y_test):.3f}",
                    f"{np.mean(s_test[~y_test] > t):.3f}",
                    f"{np.mean(s_test[y_test] > t):.3f}",
                ]
            lines.append(
                f"| {name} ({len(labels)}, {int(labels.sum())}) | {rule} | {t:.3f} | "
                f"{accuracy(t, pooled, y_pooled):.3f} | {np.mean(pooled[~y_pooled] > t):.3f} | {' | '.join(check)} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
