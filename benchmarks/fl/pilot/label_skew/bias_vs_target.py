"""Would a discount keyed on the head-bias delta spare the attack's target class? (a diagnosis, not a rule)

Reads ``bias_delta.py``'s ``--out`` JSON and the saved evidence of the same run. For every benign update of the
planted recipe's screened rounds whose single-round standardised evidence (the shipped screen's calibration: last 5
calibration rounds) reaches ``--z`` on some class, and for every attacker update's target class (0), prints how far
the class stands out in the update's own centred bias delta (the bias delta minus the round's median client per
class; then a robust z over the update's classes, ``(b_c − median_c b) / (1.4826 · MAD)``) and its rank among the
update's classes.

    python benchmarks/fl/pilot/label_skew/bias_vs_target.py bias_femnist.json \
        benchmarks/fl/results/screening_null_match_femnist.evidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from metashield_hf.fl import ClientEvidence, ScreenCalibration

SIGNALS = ("margin_gain", "trigger_drift", "point_margin_gain")
RECIPE = "model_replacement_constrained_planted"


def evidence_of(saved: dict) -> ClientEvidence:
    return ClientEvidence.from_raw(saved["raw"])


def within_z(b: np.ndarray, c: int) -> float:
    m = np.median(b)
    return float((b[c] - m) / (1.4826 * np.median(np.abs(b - m))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bias", type=Path)
    parser.add_argument("evidence", type=Path)
    parser.add_argument("--z", type=float, default=8.0)
    parser.add_argument("--target", type=int, default=0)
    args = parser.parse_args(argv)
    every = json.loads(args.bias.read_text())
    rows = {(r["round"], r["client"]): r for r in every if r["phase"] == "planted"}
    norms: dict[str, list[float]] = {}
    for r in every:
        if not r["malicious"]:
            norms.setdefault(r["client"], []).append(r["norm"])
    print("benign update norm per client, median over its recorded rounds (calibration and screened):",
          {c: round(float(np.median(v)), 2) for c, v in sorted(norms.items(), key=lambda x: int(x[0]))})  # fmt: skip
    saved = next(iter(json.loads(args.evidence.read_text()).values()))
    cal = ScreenCalibration(signals=SIGNALS, accumulate=False)
    for r, rd in enumerate(saved["calibration"][-5:]):
        cal.update(evidence_of(rd), round_id=r, client_ids=rd["clients"])
    for sig in SIGNALS:  # the calibration's per-class scale (median absolute deviation, as the screen takes it)
        h = np.asarray(cal.rows[sig], dtype=np.float64)
        scale = np.maximum(1.4826 * np.median(np.abs(h - np.median(h, axis=0)), axis=0), cal.min_scale[sig])
        if len(scale) > 10:
            print(f"{sig}: calibration scale, median over classes 0-9 {np.median(scale[:10]):.3f}, over classes "
                  f"10+ {np.median(scale[10:]):.3f}")  # fmt: skip
    spikes, target, spread = [], [], []
    for t, rd in enumerate(saved["attacks"][RECIPE]["rounds"], start=1):
        z = cal.assess(evidence_of(rd)).z
        centred = evidence_of(rd).centred_for("point_margin_gain", by_round=False)
        spread.extend((t, client, float(np.median(np.abs(centred[k])))) for k, client in enumerate(rd["clients"]))
        for k, client in enumerate(rd["clients"]):
            row = rows[(t, client)]
            b = np.asarray(row["centred_bias"])
            if row["malicious"]:
                c = args.target
                target.append((t, client, within_z(b, c), int((b > b[c]).sum()) + 1, b[c]))
                continue
            top = max((float(z[s][k].max()), int(z[s][k].argmax())) for s in SIGNALS)
            if top[0] >= args.z:
                c = top[1]
                spikes.append((t, client, c, top[0], within_z(b, c), int((b > b[c]).sum()) + 1, b[c],
                               float(np.median(np.abs(centred[k])))))  # fmt: skip
    print(f"benign updates whose largest single-round z >= {args.z}: round, client, class, evidence z, "
          f"bias-delta within-update z, rank, centred bias delta, the update's median |point_margin_gain| over "
          f"classes (centred on the candidate)")  # fmt: skip
    for t, client, c, zc, wz, rank, bc, med in spikes:
        print(f"  {t:2d} {client:>3s} class {c:2d}  z {zc:5.1f}  bias z {wz:5.1f}  rank {rank:2d}  {bc:+.4f}  "
              f"{med:.2f}")  # fmt: skip
    med = np.asarray([x[2] for x in spread])
    print(f"every update of these rounds, median |point_margin_gain| over classes: median {np.median(med):.2f}, "
          f"90th pct {np.percentile(med, 90):.2f}; the 3 largest (round, client, value): "
          f"{sorted(spread, key=lambda x: -x[2])[:3]}")  # fmt: skip
    wz = np.asarray([x[2] for x in target])
    print(f"attacker updates, target's bias-delta within-update z: median {np.median(wz):.2f}")
    print(f"attacker updates ({len(target)}), target class {args.target}: bias-delta within-update z "
          f"{sorted(np.round(wz, 1).tolist())}; largest class in {sum(x[3] == 1 for x in target)}, top 3 in "
          f"{sum(x[3] <= 3 for x in target)}")  # fmt: skip
    for cut in sorted({x[4] for x in spikes}):
        print(
            f"  a discount at bias z >= {cut:.1f} (the spikes at or above it: {sum(x[4] >= cut for x in spikes)} "
            f"of {len(spikes)}) also discounts the target in {int((wz >= cut).sum())} of {len(wz)} attacker updates"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
