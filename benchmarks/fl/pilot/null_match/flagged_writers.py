"""Which benign clients the accumulated calibrated screen flags on a saved run, and why (a diagnosis, not a rule).

Rescores the planted recipe's screened rounds from a ``run.py --save_evidence`` file (``<name>.evidence.json``) with a
calibration on the last ``--window`` measured rounds and the ``--null_counts`` null (the defaults are the shipped
screen's), then lists every flagged benign update: round, client, the rounds it has been seen in, the signal and
class its statistic came from, the statistic, and the largest single-round standardised evidence it carries so far.
Also prints how often each client appears in the calibration rounds and in the screened ones.

    python benchmarks/fl/pilot/null_match/flagged_writers.py benchmarks/fl/results/screening_null_match_femnist.evidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from metashield_hf.fl import ClientEvidence, EvidenceSettings, ScreenCalibration

SIGNALS = ("margin_gain", "trigger_drift", "point_margin_gain")
RECIPE = "model_replacement_constrained_planted"


def evidence_of(saved: dict) -> ClientEvidence:
    return ClientEvidence.from_raw(saved["raw"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evidence", type=Path)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--null_counts", default="running", choices=["running", "matched"])
    parser.add_argument("--attack", default=RECIPE)
    args = parser.parse_args(argv)
    for setting, saved in json.loads(args.evidence.read_text()).items():
        cal = ScreenCalibration(signals=SIGNALS, accumulate=True, null_counts=args.null_counts,
                                settings=EvidenceSettings())  # fmt: skip
        for r, rd in enumerate(saved["calibration"][-args.window :]):
            cal.update(evidence_of(rd), round_id=r, client_ids=rd["clients"])
        attack = saved["attacks"][args.attack]
        malicious = set(attack["malicious"])
        counts = Counter()
        largest: dict[str, float] = {}
        single = ScreenCalibration.from_dict({**cal.to_dict(), "accumulate": False})  # one round's z, no memory
        print(f"## {setting}, {args.attack}: last {args.window} calibration rounds, {args.null_counts} null")
        print("| round | client | seen | signal | class | statistic | largest single-round z so far |")
        print("|---|---|---|---|---|---|---|")
        for t, rd in enumerate(attack["rounds"], start=1):
            ev = evidence_of(rd)
            z_round = single.assess(ev).z
            verdict = cal.assess(ev, client_ids=rd["clients"])
            for k, client in enumerate(rd["clients"]):
                counts[(client, bool(client in malicious), bool(verdict.flagged[k]))] += 1
                largest[client] = max(largest.get(client, -np.inf), max(float(z[k].max()) for z in z_round.values()))
                if verdict.flagged[k] and client not in malicious:
                    print(f"| {t} | {client} | {cal.memory[client]['count']} | {verdict.top_signal[k]} | "
                          f"{int(verdict.top_class[k])} | {verdict.statistic[k]:.1f} | {largest[client]:.1f} |")  # fmt: skip
        fp = sum(n for (c, bad, flag), n in counts.items() if not bad and flag)
        benign = sum(n for (c, bad, _), n in counts.items() if not bad)
        tp = sum(n for (c, bad, flag), n in counts.items() if bad and flag)
        bad = sum(n for (c, b, _), n in counts.items() if b)
        print(f"\nTPR {tp / bad:.2f} ({tp}/{bad}), FPR {fp / benign:.2f} ({fp}/{benign})")
        print("calibration appearances:", dict(Counter(c for rd in saved["calibration"] for c in rd["clients"])))
        print("screened appearances:", dict(Counter(c for rd in attack["rounds"] for c in rd["clients"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
