"""Offline pilot: fixed-point signals on the global model's max-margin inputs and synthesized triggers."""

import copy
import math
import os
import pickle
import sys

import numpy as np
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
from metashield_hf.fl.screen import candidate_state, flatten  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN  # noqa: E402
from metashield_hf.scan.max_margin import max_margins  # noqa: E402
from metashield_hf.scan.scanner import prepare_clean_items, run_synthesis  # noqa: E402
from metashield_hf.targets import load_target  # noqa: E402

alg = sys.argv[1]
cap = torch.load(f"artifacts/amp/cap_{alg}.pt", weights_only=False)
clean = cap["clean"]


def margin(logits, c):
    o = logits.clone()
    tgt = o[..., c].clone()
    o[..., c] = -1e9
    return tgt - o.max(-1).values


def ev(state, deltas):
    g = SmallCNN(1, 10)
    g.load_state_dict(state)
    g.eval()
    ad = load_target(g, None)
    items = prepare_clean_items(ad, clean, 10, 0)
    with torch.no_grad():
        ad(items)
    mm = max_margins(ad, items, 10, steps=20, starts=4, lr=0.1, seed=0, progress=False)
    _, syn, _ = run_synthesis(ad, items, steps=20, lr=0.1, flip_threshold=0.9, class_batch=16, seed=0, progress=False)
    x = clean.float()
    xs = mm.inputs.float()  # (C, 1, 28, 28)
    m, p = syn.masks.float(), syn.patterns.float()
    if m.dim() == 3:
        m = m[:, None]
    patched = torch.stack([(1 - m[c]) * x + m[c] * p[c] for c in range(10)])  # (C, N, 1, 28, 28)

    def feats(model):
        with torch.no_grad():
            a = torch.stack([margin(model(xs[c : c + 1])[0], c) for c in range(10)])  # (C,)
            b = torch.stack([margin(model(patched[c]), c) for c in range(10)])  # (C, N)
            cl = torch.stack([margin(model(x), c) for c in range(10)])  # (C, N)
        return a.numpy(), b.numpy(), cl.numpy()

    A0, B0, C0 = feats(g)
    norms = np.array([math.sqrt(float(flatten(d) @ flatten(d))) for d in deltas])
    out = {"norms": norms, "fp_margin": [], "trig_gain": [], "trig_raw": []}
    cand = copy.deepcopy(g)
    for d in deltas:
        cand.load_state_dict(candidate_state(state, d))
        cand.eval()
        a, b, cl = feats(cand)
        out["fp_margin"].append(a - A0)
        out["trig_raw"].append((b - B0).mean(1))
        out["trig_gain"].append(((b - B0) - (cl - C0)).mean(1))
    return {k: np.array(v) if k != "norms" else v for k, v in out.items()}


res = {"calib": [], "attacks": {}}
for state, deltas, ids in cap["calib"]:
    res["calib"].append({"ids": ids, "base": ev(state, deltas)})
for name, a in cap["attacks"].items():
    rows = [{"ids": ids, "base": ev(state, deltas)} for state, deltas, ids in a["rounds"]]
    res["attacks"][name] = {"rounds": rows, "malicious": a["malicious"], "eval": a["eval"]}
    print(name, flush=True)
pickle.dump(res, open(f"artifacts/amp/ev2_{alg}.pkl", "wb"))
