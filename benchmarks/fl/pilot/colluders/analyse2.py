import pickle
import sys

import numpy as np

MAD = 1.4826
MINS = {"margin_gain": 0.05, "trigger_drift": 0.01}


def centre(v, by_round):
    v = v - np.median(v, axis=1, keepdims=True)
    if by_round:
        v = v - np.median(v, axis=0)
    return v


def scales(rows):
    loc = np.median(rows, 0)
    return loc, MAD * np.median(np.abs(rows - loc), 0)


def zs(rounds, sigs, src, by_round, hist_rounds, ref_sel=None):
    """z (K,C) per signal per round, standardised against hist_rounds."""
    out = []
    H = {s: np.concatenate([centre(r[src][s], by_round) for r in hist_rounds]) for s in sigs}
    sc = {s: scales(H[s]) for s in sigs}
    for r in rounds:
        out.append({s: (centre(r[src][s], by_round) - sc[s][0]) / np.maximum(sc[s][1], MINS[s]) for s in sigs})
    return out


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


def evaluate(res, sigs, src, by_round, stat, fpr=0.10):
    calib = res["calib"]
    # null: leave-one-round-out
    null = []
    for i, r in enumerate(calib):
        z = zs([r], sigs, src, by_round, calib[:i] + calib[i + 1 :])[0]
        null.append(stat(z))
    nullc = np.concatenate(null)

    def pval(t):
        return (1 + (nullc[None] >= t[:, None]).sum(1)) / (1 + len(nullc))

    out = {}
    for name, a in res["attacks"].items():
        tp = fn = fp = tn = 0
        zz = zs(a["rounds"], sigs, src, by_round, calib)
        for r, z in zip(a["rounds"], zz, strict=False):
            f = pval(stat(z)) <= fpr
            for cid, fl in zip(r["ids"], f, strict=False):
                bad = cid in a["malicious"]
                tp += bad and fl
                fn += bad and not fl
                fp += (not bad) and fl
                tn += (not bad) and not fl
        out[name] = (tp / (tp + fn), fp / (fp + tn))
    return out


algs = sys.argv[1:]
res = {a: pickle.load(open(f"artifacts/amp/ev_{a}.pkl", "rb")) for a in algs}
SIG = {"m": ("margin_gain",), "d": ("trigger_drift",), "md": ("margin_gain", "trigger_drift")}
stats = {"single": single, "agree2": lambda z: agree(z, 2), "agree3": lambda z: agree(z, 3)}
for src in ["base", "amp3"]:
    for sname, sigs in SIG.items():
        for by_round in (True, False):
            for stn, st in stats.items():
                line = []
                for a in algs:
                    o = evaluate(res[a], sigs, src, by_round, st)
                    line.append(" ".join(f"{n[:10]}={t:.2f}/{f:.2f}" for n, (t, f) in o.items()))
                print(f"{src:5s} {sname:3s} {'rnd' if by_round else 'nr ':3s} {stn:7s}| " + " || ".join(line))
