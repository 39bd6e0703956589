import pickle
import sys

import numpy as np

import metashield_hf.fl.calibration as C
from metashield_hf.fl.calibration import ClientEvidence, EvidenceSettings, ScreenCalibration

algs = sys.argv[1:]


def names(src):  # src key -> signal names
    return {f"{src}:margin": ("margin_gain", src), f"{src}:drift": ("trigger_drift", src)}


def evidence(row, sigs):
    raw = {s: row[src][base] for s, (base, src) in sigs.items()}
    k = len(row["ids"])
    return ClientEvidence(raw, raw, None, row["norms"], np.zeros(k))


def run(res, sigs, by_round):
    C.CALIBRATED_SIGNALS = tuple(sigs)
    ms = {s: (0.05 if b == "margin_gain" else 0.01) for s, (b, _) in sigs.items()}
    cal = ScreenCalibration(
        signals=tuple(sigs), target_fpr=0.10, min_scale=ms, settings=EvidenceSettings(centre_by_round=by_round)
    )
    for r, row in enumerate(res["calib"]):
        cal.update(evidence(row, sigs), round_id=r)
    out = {}
    for name, a in res["attacks"].items():
        tp = fn = fp = tn = 0
        for row in a["rounds"]:
            got = cal.assess(evidence(row, sigs))
            for cid, f in zip(row["ids"], got.flagged, strict=False):
                bad = cid in a["malicious"]
                tp += bad and f
                fn += bad and not f
                fp += (not bad) and f
                tn += (not bad) and not f
        out[name] = (tp / (tp + fn), fp / (fp + tn))
    return out


allres = {a: pickle.load(open(f"artifacts/amp/ev_{a}.pkl", "rb")) for a in algs}
srcs = [k for k in allres[algs[0]]["calib"][0] if k not in ("ids", "norms")]
cands = {}
for src in srcs:
    n = names(src)
    cands[f"{src}:m"] = {k: v for k, v in n.items() if k.endswith("margin")}
    cands[f"{src}:d"] = {k: v for k, v in n.items() if k.endswith("drift")}
    cands[f"{src}:md"] = n
for src in srcs[1:]:
    cands[f"base+{src}:md"] = {**names("base"), **names(src)}
    cands[f"base:md+{src}:m"] = {**names("base"), f"{src}:margin": ("margin_gain", src)}
for cname, sigs in cands.items():
    for by_round in (True, False):
        line = []
        for a in algs:
            o = run(allres[a], sigs, by_round)
            line.append(" ".join(f"{n[:12]}={t:.2f}/{f:.2f}" for n, (t, f) in o.items()))
        print(f"{cname:22s} {'rnd' if by_round else 'nr ':3s} | " + " || ".join(line))
