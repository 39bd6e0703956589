"""Offline analyses of the captured pilot evidence: TPR / FPR per attack at target FPR 0.10.

--study amplified: the benchmark's ScreenCalibration on plain and amplified candidates (reads ev_ALG.pkl).
--study agreement: colluder agreement, a client's class counted only where other clients of the round are high too.
--study point: fixed-point and trigger margins and their combinations (reads ev_ALG.pkl and ev2_ALG.pkl).
--study accumulated: each client's z accumulated over its rounds, per client id (same inputs as point).
"""

import argparse
import pickle

import numpy as np

import metashield_hf.fl.calibration as C
from metashield_hf.fl.calibration import ClientEvidence, EvidenceSettings, ScreenCalibration

M, D, F, T = "margin_gain", "trigger_drift", "fp_margin", "trig_raw"
MAD = 1.4826
MINS = {M: 0.05, D: 0.01}
ATTACK = "model_replacement_constrained_planted"  # whose flagged colluders per round the point studies print


# --- signals and evidence ---------------------------------------------------------------------------------------


def names(src):  # src key -> calibrated signal names
    return {f"{src}:margin": (M, src), f"{src}:drift": (D, src)}


def evidence(row, sigs):
    raw = {s: row[src][base] for s, (base, src) in sigs.items()}
    k = len(row["ids"])
    return ClientEvidence(raw, raw, None, row["norms"], np.zeros(k))


def load(alg):
    return pickle.load(open(f"artifacts/amp/ev_{alg}.pkl", "rb"))


def load_merged(alg):
    """ev_ALG (pilot.py) and ev2_ALG (pilot2.py) as one flat row of signals per round."""
    r1 = load(alg)
    r2 = pickle.load(open(f"artifacts/amp/ev2_{alg}.pkl", "rb"))

    def merge(a, b):
        d = {"ids": a["ids"]}
        d.update(a["base"])
        d.update({k: v for k, v in b["base"].items() if k != "norms"})
        for f in ("amp3", "amp8"):
            if f in a:
                d.update({f"{f}_{k}": v for k, v in a[f].items()})
        return d

    res = {"calib": [merge(a, b) for a, b in zip(r1["calib"], r2["calib"], strict=False)], "attacks": {}}
    for n in r1["attacks"]:
        res["attacks"][n] = {
            "malicious": r1["attacks"][n]["malicious"],
            "rounds": [
                merge(a, b) for a, b in zip(r1["attacks"][n]["rounds"], r2["attacks"][n]["rounds"], strict=False)
            ],
        }
    return res


def flat(res, src):
    """The rows of one evidence source (base, amp3, ...) as flat rows, as load_merged gives them."""

    def rows(rs):
        return [{"ids": r["ids"], **r[src]} for r in rs]

    attacks = {n: {"malicious": a["malicious"], "rounds": rows(a["rounds"])} for n, a in res["attacks"].items()}
    return {"calib": rows(res["calib"]), "attacks": attacks}


# --- TPR / FPR ------------------------------------------------------------------------------------------------------


def rates(rounds, flags, malicious):
    """TPR, FPR and the colluders flagged per round, from each round's per-client flags."""
    tp = fn = fp = tn = 0
    per = []
    for r, f in zip(rounds, flags, strict=False):
        per.append(sum(fl for cid, fl in zip(r["ids"], f, strict=False) if cid in malicious))
        for cid, fl in zip(r["ids"], f, strict=False):
            bad = cid in malicious
            tp += bad and fl
            fn += bad and not fl
            fp += (not bad) and fl
            tn += (not bad) and not fl
    return tp / (tp + fn), fp / (fp + tn), per


def centre(v, by_round):
    v = v - np.median(v, axis=1, keepdims=True)
    if by_round:
        v = v - np.median(v, axis=0)
    return v


def zs(rounds, spec, hist):
    """z (K, C) per signal per round, standardised against hist; spec: (signal, centred by round)."""
    sc = {}
    for s, br in spec:
        H = np.concatenate([centre(r[s], br) for r in hist])
        loc = np.median(H, 0)
        sc[s] = (loc, np.maximum(MAD * np.median(np.abs(H - loc), 0), MINS.get(s, 1e-3)))
    return [{s: (centre(r[s], br) - sc[s][0]) / sc[s][1] for s, br in spec} for r in rounds]


def single(z):  # (K,)
    return np.max([v.max(1) for v in z.values()], 0)


def agree(z, g):
    out = []
    for v in z.values():
        K = len(v)
        a = np.full(K, -np.inf)
        for k in range(K):
            others = np.delete(v, k, 0)
            sup = np.sort(others, 0)[::-1][g - 2] if len(others) >= g - 1 else np.full(v.shape[1], -np.inf)
            a[k] = np.max(np.minimum(v[k], sup))
        out.append(a)
    return np.max(out, 0)


def per_round(stat):
    return lambda zz, ids: [stat(z) for z in zz]


def accumulate(rounds_z, rounds_ids, spec_names):
    """per-round list of (K,) statistics, each client's per-class z summed over its appearances / sqrt(m)."""
    sums, counts, out = {}, {}, []
    for z, ids in zip(rounds_z, rounds_ids, strict=False):
        stat = []
        for k, cid in enumerate(ids):
            for s in spec_names:
                sums[(cid, s)] = sums.get((cid, s), 0) + z[s][k]
            counts[cid] = counts.get(cid, 0) + 1
            stat.append(max((sums[(cid, s)] / np.sqrt(counts[cid])).max() for s in spec_names))
        out.append(np.array(stat))
    return out


def evaluate(res, spec, stats=None, fpr=0.10):
    """Flags at empirical p <= fpr against the leave-one-calibration-round-out null; stats(z per round, ids per round)."""
    stats = stats or per_round(single)
    calib = res["calib"]
    cz = [zs([r], spec, calib[:i] + calib[i + 1 :])[0] for i, r in enumerate(calib)]
    nullc = np.concatenate(stats(cz, [r["ids"] for r in calib]))

    def pval(t):
        return (1 + (nullc[None] >= t[:, None]).sum(1)) / (1 + len(nullc))

    out = {}
    for name, a in res["attacks"].items():
        st = stats(zs(a["rounds"], spec, calib), [r["ids"] for r in a["rounds"]])
        out[name] = rates(a["rounds"], [pval(t) <= fpr for t in st], a["malicious"])
    return out


def calibrated(res, sigs, by_round):
    """The benchmark's ScreenCalibration on the signals sigs (name -> (base signal, source))."""
    C.CALIBRATED_SIGNALS = tuple(sigs)
    ms = {s: MINS[b] for s, (b, _) in sigs.items()}
    cal = ScreenCalibration(
        signals=tuple(sigs), target_fpr=0.10, min_scale=ms, settings=EvidenceSettings(centre_by_round=by_round)
    )
    for r, row in enumerate(res["calib"]):
        cal.update(evidence(row, sigs), round_id=r)
    out = {}
    for name, a in res["attacks"].items():
        flags = [cal.assess(evidence(row, sigs)).flagged for row in a["rounds"]]
        out[name] = rates(a["rounds"], flags, a["malicious"])
    return out


def summary(o, width):
    return " ".join(f"{n[:width]}={t:.2f}/{f:.2f}" for n, (t, f, _) in o.items())


# --- studies --------------------------------------------------------------------------------------------------------


def amplified(algs):
    allres = {a: load(a) for a in algs}
    srcs = [k for k in allres[algs[0]]["calib"][0] if k not in ("ids", "norms")]
    cands = {}
    for src in srcs:
        n = names(src)
        cands[f"{src}:m"] = {k: v for k, v in n.items() if k.endswith("margin")}
        cands[f"{src}:d"] = {k: v for k, v in n.items() if k.endswith("drift")}
        cands[f"{src}:md"] = n
    for src in srcs[1:]:
        cands[f"base+{src}:md"] = {**names("base"), **names(src)}
        cands[f"base:md+{src}:m"] = {**names("base"), f"{src}:margin": (M, src)}
    for cname, sigs in cands.items():
        for by_round in (True, False):
            line = [summary(calibrated(allres[a], sigs, by_round), 12) for a in algs]
            print(f"{cname:22s} {'rnd' if by_round else 'nr ':3s} | " + " || ".join(line))


def agreement(algs):
    res = {a: load(a) for a in algs}
    sig = {"m": (M,), "d": (D,), "md": (M, D)}
    stats = {"single": single, "agree2": lambda z: agree(z, 2), "agree3": lambda z: agree(z, 3)}
    for src in ["base", "amp3"]:
        rows = {a: flat(res[a], src) for a in algs}
        for sname, sigs in sig.items():
            for by_round in (True, False):
                spec = [(s, by_round) for s in sigs]
                for stn, st in stats.items():
                    line = [summary(evaluate(rows[a], spec, per_round(st)), 10) for a in algs]
                    print(f"{src:5s} {sname:3s} {'rnd' if by_round else 'nr ':3s} {stn:7s}| " + " || ".join(line))


def point(algs):
    specs = {
        "md-rnd": [(M, True), (D, True)],
        "fpm-nr": [(F, False)],
        "fpm-rnd": [(F, True)],
        "md-rnd+fpm-nr": [(M, True), (D, True), (F, False)],
        "m-rnd+fpm-nr": [(M, True), (F, False)],
        "md-rnd+fpm-nr+tr-nr": [(M, True), (D, True), (F, False), (T, False)],
        "fpm-nr+tr-nr": [(F, False), (T, False)],
        "md-rnd+fpm-rnd": [(M, True), (D, True), (F, True)],
    }
    res = {a: load_merged(a) for a in algs}
    for sname, spec in specs.items():
        line = []
        for a in algs:
            o = evaluate(res[a], spec)
            line.append(summary(o, 10) + " per" + str(o[ATTACK][2]))
        print(f"{sname:22s}| " + " || ".join(line))


def accumulated(algs):
    specs = {
        "md-rnd": [(M, True), (D, True)],
        "md-nr": [(M, False), (D, False)],
        "fpm-nr": [(F, False)],
        "md-rnd+fpm-nr": [(M, True), (D, True), (F, False)],
        "m-rnd": [(M, True)],
        "d-rnd": [(D, True)],
        "m-rnd+fpm-nr": [(M, True), (F, False)],
        "fpm-nr+tr-nr": [(F, False), (T, False)],
    }
    res = {a: load_merged(a) for a in algs}
    for sname, spec in specs.items():
        line = []
        for a in algs:
            o = evaluate(res[a], spec, lambda zz, ids, spec=spec: accumulate(zz, ids, [s for s, _ in spec]))
            line.append(summary(o, 10) + " per" + str([int(x) for x in o[ATTACK][2]]))
        print(f"{sname:18s}| " + " || ".join(line))


STUDIES = {"amplified": amplified, "agreement": agreement, "point": point, "accumulated": accumulated}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("algs", nargs="+", help="federated algorithms captured under artifacts/amp/ (e.g. fedavg)")
    parser.add_argument("--study", choices=list(STUDIES), required=True)
    args = parser.parse_args()
    STUDIES[args.study](args.algs)
