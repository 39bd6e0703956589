import sys

import numpy as np

sys.path.insert(0, "benchmarks/fl/pilot/colluders")
from analyse4 import load, zs


def accumulate(rounds_z, rounds_ids, spec_names, decay=None):
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


def evaluate(res, spec, fpr=0.10, acc=True):
    calib = res["calib"]
    names = [s for s, _ in spec]
    cz = [zs([r], spec, calib[:i] + calib[i + 1 :])[0] for i, r in enumerate(calib)]
    nullc = np.concatenate(
        accumulate(cz, [r["ids"] for r in calib], names)
        if acc
        else [np.max([v.max(1) for v in z.values()], 0) for z in cz]
    )

    def pval(t):
        return (1 + (nullc[None] >= t[:, None]).sum(1)) / (1 + len(nullc))

    out = {}
    for name, a in res["attacks"].items():
        tp = fn = fp = tn = 0
        per = []
        az = zs(a["rounds"], spec, calib)
        stats = (
            accumulate(az, [r["ids"] for r in a["rounds"]], names)
            if acc
            else [np.max([v.max(1) for v in z.values()], 0) for z in az]
        )
        for r, st in zip(a["rounds"], stats, strict=False):
            f = pval(st) <= fpr
            per.append(int(sum(fl for cid, fl in zip(r["ids"], f, strict=False) if cid in a["malicious"])))
            for cid, fl in zip(r["ids"], f, strict=False):
                bad = cid in a["malicious"]
                tp += bad and fl
                fn += bad and not fl
                fp += (not bad) and fl
                tn += (not bad) and not fl
        out[name] = (tp / (tp + fn), fp / (fp + tn), per)
    return out


algs = sys.argv[1:]
res = {a: load(a) for a in algs}
M, D, F, T = "margin_gain", "trigger_drift", "fp_margin", "trig_raw"
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
for sname, spec in specs.items():
    line = []
    for a in algs:
        o = evaluate(res[a], spec)
        line.append(
            " ".join(f"{n[:10]}={t:.2f}/{f:.2f}" for n, (t, f, per) in o.items())
            + " per"
            + str(o["model_replacement_constrained_planted"][2])
        )
    print(f"{sname:18s}| " + " || ".join(line))
