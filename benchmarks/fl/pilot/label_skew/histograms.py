"""Do the honest FEMNIST spikes sit on a writer's own over-represented classes? (a diagnosis, not a rule)

Loads the 20 FEMNIST writers exactly as ``benchmarks/fl/run.py`` does (``load_femnist_clients(max_writers=20,
min_samples=50, seed=0)``; client id ``k`` is the k-th writer), rescoring the saved evidence of the planted recipe's
screened rounds with the shipped screen (last 5 calibration rounds, running null) and, for every benign update whose
single-round standardised evidence has a class at z >= ``--z``, prints the class, its z, the writer's share of that
class, the class's rank among the writer's own classes and its share relative to the pooled share of the 20 writers.
Also prints every screened writer's top classes and the attack's target class (0).

    METASHIELD_DATA=<data folder> python benchmarks/fl/pilot/label_skew/histograms.py \
        benchmarks/fl/results/screening_null_match_femnist.evidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from metashield_hf.fl import ClientEvidence, EvidenceSettings, ScreenCalibration
from metashield_hf.fl.data import load_femnist_clients

SIGNALS = ("margin_gain", "trigger_drift", "point_margin_gain")
RECIPE = "model_replacement_constrained_planted"
CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def evidence_of(saved: dict) -> ClientEvidence:
    return ClientEvidence.from_raw(saved["raw"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evidence", type=Path)
    parser.add_argument("--z", type=float, default=8.0, help="list single-round class z at or above this")
    parser.add_argument("--attack", default=RECIPE)
    parser.add_argument("--out", type=Path, default=None, help="write the histograms as JSON here")
    parser.add_argument("--bias", type=Path, default=None,
                        help="bias_delta.py's --out JSON of the same run: add the spike class's rank in the update's "
                        "centred head-bias delta and in the global model's residual on the client's data")  # fmt: skip
    args = parser.parse_args(argv)
    fed = load_femnist_clients(max_writers=20, min_samples=50, seed=0)
    hist = np.stack([np.bincount(c.y.numpy(), minlength=fed.num_classes) for c in fed.clients]).astype(float)
    share = hist / hist.sum(axis=1, keepdims=True)
    pooled = hist.sum(axis=0) / hist.sum()
    print("writers:", fed.client_names)
    print("samples per writer:", hist.sum(axis=1).astype(int).tolist())
    for k in range(len(hist)):
        top = np.argsort(-share[k])[:5]
        cells = ", ".join(f"{c} ('{CHARS[c]}') {share[k, c]:.3f} (x{share[k, c] / pooled[c]:.1f})" for c in top)
        print(f"writer {k:2d} (n={int(hist[k].sum())}): share of class 0 {share[k, 0]:.3f}; top: {cells}")
    if args.out:
        args.out.write_text(json.dumps({"writers": fed.client_names, "hist": hist.astype(int).tolist()}))
    for setting, saved in json.loads(args.evidence.read_text()).items():
        cal = ScreenCalibration(signals=SIGNALS, accumulate=False, settings=EvidenceSettings())
        for r, rd in enumerate(saved["calibration"][-5:]):
            cal.update(evidence_of(rd), round_id=r, client_ids=rd["clients"])
        attack = saved["attacks"][args.attack]
        bad = set(attack["malicious"])
        print(f"\n## {setting}, {args.attack}: single-round class z >= {args.z} (benign and malicious)")
        bias = {}
        if args.bias:
            bias = {(r["round"], r["client"]): r for r in json.loads(args.bias.read_text()) if r["phase"] == "planted"}
        print("| round | client | malicious | signal | class | z | writer's share | rank in writer | x pooled | "
              "samples | rank in bias delta | residual | rank in residual |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        ranks = {True: [], False: []}
        for t, rd in enumerate(attack["rounds"], start=1):
            z = cal.assess(evidence_of(rd)).z
            for k, client in enumerate(rd["clients"]):
                w = int(client)
                for s in SIGNALS:
                    for c in np.flatnonzero(z[s][k] >= args.z):
                        rank = int((share[w] > share[w, c]).sum()) + 1
                        ranks[client in bad].append(rank)
                        extra = ""
                        if (t, client) in bias:
                            b = np.asarray(bias[(t, client)]["centred_bias"])
                            res = np.asarray(bias[(t, client)]["residual"])
                            extra = (f" {int((b > b[c]).sum()) + 1} | {res[c]:+.2f} | "
                                     f"{int((res > res[c]).sum()) + 1} |")  # fmt: skip
                        print(f"| {t} | {client} | {client in bad} | {s} | {c} ('{CHARS[c]}') | {z[s][k, c]:.1f} | "
                              f"{share[w, c]:.3f} | {rank} | {share[w, c] / pooled[c]:.1f} | {int(hist[w, c])} |"
                              + extra)  # fmt: skip
        if bias:  # the statistic's own class (the max over classes and signals) and the target class
            for name, sel in (("benign", False), ("malicious", True)):
                top_rank, target_rank = [], []
                for t, rd in enumerate(attack["rounds"], start=1):
                    a = cal.assess(evidence_of(rd))
                    for k, client in enumerate(rd["clients"]):
                        if (client in bad) != sel:
                            continue
                        b = np.asarray(bias[(t, client)]["centred_bias"])
                        top_rank.append(int((b > b[int(a.top_class[k])]).sum()) + 1)
                        target_rank.append(int((b > b[0]).sum()) + 1)
                tr, gr = np.asarray(top_rank), np.asarray(target_rank)
                print(f"{name} ({len(tr)} updates): the statistic's class is the update's largest centred bias delta "
                      f"in {(tr == 1).sum()}, in its top 3 in {(tr <= 3).sum()}; the target class 0 is its largest in "
                      f"{(gr == 1).sum()}, in its top 3 in {(gr <= 3).sum()}")  # fmt: skip
        for b, r in ranks.items():
            if r:
                print(f"{'malicious' if b else 'benign'}: {len(r)} spikes, median rank {np.median(r):.0f}, "
                      f"in the writer's top 3: {sum(x <= 3 for x in r)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
