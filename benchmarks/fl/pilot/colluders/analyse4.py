import pickle
import sys

import numpy as np

MAD = 1.4826


def centre(v, by_round):
    v = v - np.median(v, axis=1, keepdims=True)
    if by_round:
        v = v - np.median(v, axis=0)
    return v


MINS = {"margin_gain": 0.05, "trigger_drift": 0.01}


def zs(rounds, spec, hist):
    sc = {}
    for s, br in spec:
        H = np.concatenate([centre(r[s], br) for r in hist])
        loc = np.median(H, 0)
        sc[s] = (loc, np.maximum(MAD * np.median(np.abs(H - loc), 0), MINS.get(s, 1e-3)))
    return [{s: (centre(r[s], br) - sc[s][0]) / sc[s][1] for s, br in spec} for r in rounds]


def single(z):
    return np.max([v.max(1) for v in z.values()], 0)


def evaluate(res, spec, stat=single, fpr=0.10):
    calib = res["calib"]
    nullc = np.concatenate([stat(zs([r], spec, calib[:i] + calib[i + 1 :])[0]) for i, r in enumerate(calib)])

    def pval(t):
        return (1 + (nullc[None] >= t[:, None]).sum(1)) / (1 + len(nullc))

    out = {}
    for name, a in res["attacks"].items():
        tp = fn = fp = tn = 0
        per = []
        for r, z in zip(a["rounds"], zs(a["rounds"], spec, calib), strict=False):
            f = pval(stat(z)) <= fpr
            per.append(sum(fl for cid, fl in zip(r["ids"], f, strict=False) if cid in a["malicious"]))
            for cid, fl in zip(r["ids"], f, strict=False):
                bad = cid in a["malicious"]
                tp += bad and fl
                fn += bad and not fl
                fp += (not bad) and fl
                tn += (not bad) and not fl
        out[name] = (tp / (tp + fn), fp / (fp + tn), per)
    return out


def load(alg):
    r1 = pickle.load(open(f"artifacts/amp/ev_{alg}.pkl", "rb"))
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


if __name__ == "__main__":
    algs = sys.argv[1:]
    res = {a: load(a) for a in algs}
    M, D, F, T, G = "margin_gain", "trigger_drift", "fp_margin", "trig_raw", "trig_gain"
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
    for sname, spec in specs.items():
        line = []
        for a in algs:
            o = evaluate(res[a], spec)
            line.append(
                " ".join(f"{n[:10]}={t:.2f}/{f:.2f}" for n, (t, f, per) in o.items())
                + " per"
                + str(o["model_replacement_constrained_planted"][2])
            )
        print(f"{sname:22s}| " + " || ".join(line))
