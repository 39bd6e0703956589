"""How the scan head's text signals were chosen: cross-validated AUROC of candidate signal sets on train models only.

``scripts/scan_benchmark.py`` fits the head's small-vocabulary text part (from-scratch models, whose token search
screens the whole vocabulary) on ``--text_signals``. This script scores a fixed list of candidate sets for that part,
at C = 1 and 10, by the benchmark's repeated stratified cross-validation (``cv_head_c``) over the train side only:
the standard zoo's train models (``--split`` plus ``--head_train``) and the records of ``--extra_train`` zoos. The
held-out models play no part. Prints one line per candidate and the best.

Usage:

    python scripts/scan_text_choice.py --extra_train reports/scan_fresh_minilm.jsonl reports/scan_scratch_text.jsonl

(the stop-23 choice, on 70 small-vocabulary models; add ``reports/scan_fresh_scratch_text.jsonl`` for the stop-24 one, on
114: the same pick, ``token_logit_2`` + ``token_detector`` at C = 1, 0.861)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scan_benchmark import cv_head_c, extra_train_records, load_records, modality, refresh, variant

from metashield_hf.scan_head import LARGE_VOCABULARY, TOKEN_SIGNALS

CANDIDATES = [
    ("token_prob", "token_prob_2"),
    ("token_prob_2",),
    ("token_logit_2",),
    ("token_prob", "token_prob_2", "token_detector"),
    ("token_logit_2", "token_detector"),
    ("token_detector",),
    TOKEN_SIGNALS,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="reports/scan.jsonl", help="the standard zoo's scan records")
    parser.add_argument("--extra_train", nargs="*", default=[], help="other zoos' records (scan_check.py's OUT.jsonl)")
    parser.add_argument("--large_vocabulary_signals", nargs="*", default=["token_detector"])
    args = parser.parse_args()
    standard = refresh(list(load_records(Path(args.records).with_suffix("")).values()))
    train = [r for r in standard if r["split"] == "train"] + extra_train_records(args.extra_train)
    small = [r for r in train if modality(r) == "text" and variant(r) != LARGE_VOCABULARY]
    print(f"{len(small)} train small-vocabulary text models ({sum(r['is_backdoored'] for r in small)} backdoored)")
    results = []
    for signals in CANDIDATES:
        for c in (1.0, 10.0):
            aucs = cv_head_c(train, signals, cs=(c,), text_c=c, large_signals=tuple(args.large_vocabulary_signals))[c]
            results.append((aucs["nlp (small vocabulary)"], c, signals))
            print(f"{results[-1][0]:.3f}  C={c:g}  {list(signals)}", flush=True)
    auc, c, signals = max(results)
    print(f"best: {list(signals)} at C={c:g} ({auc:.3f})")


if __name__ == "__main__":
    main()
