"""Offline pilot: evidence variants on captured rounds."""

import math
import os
import pickle
import sys

import numpy as np
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
from metashield_hf.fl.calibration import CALIBRATED_SIGNALS, EvidenceSettings, client_evidence  # noqa: E402
from metashield_hf.fl.screen import flatten  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN  # noqa: E402

alg = sys.argv[1]
factors = [float(x) for x in sys.argv[2:]]
cap = torch.load(f"artifacts/amp/cap_{alg}.pt", weights_only=False)
clean = cap["clean"]
S = EvidenceSettings(margin_steps=20, synthesis_steps=20, n=10, seed=0)


def norms(ds):
    return np.array([math.sqrt(float(flatten(d) @ flatten(d))) for d in ds])


def ev(state, deltas):
    m = SmallCNN(1, 10)
    m.load_state_dict(state)
    out = {"norms": norms(deltas)}
    e = client_evidence(m, deltas, clean, signals=CALIBRATED_SIGNALS, settings=S)
    out["base"] = e.raw
    med = np.median(out["norms"])
    for f in factors:
        A = f * med
        sc = [{k: v * (A / n) for k, v in d.items()} for d, n in zip(deltas, out["norms"], strict=False)]
        out[f"amp{f:g}"] = client_evidence(m, sc, clean, signals=CALIBRATED_SIGNALS, settings=S).raw
    return out


res = {"calib": [], "attacks": {}}
for state, deltas, ids in cap["calib"]:
    res["calib"].append({"ids": ids, **ev(state, deltas)})
    print("calib", flush=True)
for name, a in cap["attacks"].items():
    rows = []
    for state, deltas, ids in a["rounds"]:
        rows.append({"ids": ids, **ev(state, deltas)})
        print(name, flush=True)
    res["attacks"][name] = {"rounds": rows, "malicious": a["malicious"], "eval": a["eval"]}
pickle.dump(res, open(f"artifacts/amp/ev_{alg}.pkl", "wb"))
