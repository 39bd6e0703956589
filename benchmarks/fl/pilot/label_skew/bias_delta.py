"""Can the server estimate a client's label shares from its update alone? (a diagnosis, not a rule)

For softmax cross-entropy the gradient of the head's bias is ``Σ_i (p_i − onehot(y_i))`` over the client's samples,
so after local descent a class the client holds many samples of gets a positive bias delta. This script re-trains the
FEMNIST (or MNIST) FedAvg setting of ``benchmarks/fl/run.py`` (same data, model, seeds, warm-up and calibration
rounds; no evidence measured), records every update of the calibration rounds and of the planted recipe's screened
rounds, and for every benign update compares the head's bias delta, centred on the round's median client per class,
with the client's label share minus the pooled share: the Pearson correlation per update, and whether the class with
the largest centred bias delta is among the client's 3 most over-represented classes. It also prints the update norm
and the spread of the bias delta over classes for the writers the accumulated screen flags (13 and 18 on FEMNIST).

    METASHIELD_DATA=<data folder> python benchmarks/fl/pilot/label_skew/bias_delta.py --dataset femnist
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metashield_hf.attacks import ATTACKS
from metashield_hf.fl.data import load_femnist_clients, load_mnist_clients
from metashield_hf.fl.federation import FedConfig, run_federated
from metashield_hf.fl.simulate import SmallCNN, fedavg_defence, run_screened_federated

WARMUP = {"femnist": 100, "mnist": 15}  # benchmarks/fl/run.py's warm-up rounds
RECIPE_PARAMS = {"norm_bound": 0.6, "trigger_params": {"patch_size": 8, "pattern": "checkerboard"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="femnist", choices=list(WARMUP))
    parser.add_argument("--calibration_rounds", type=int, default=20)
    parser.add_argument("--algorithm", default="fedavg")
    parser.add_argument("--evidence", type=Path, default=None, help="a saved evidence file: check the client lists")
    parser.add_argument("--out", type=Path, default=None, help="write per-update numbers as JSON")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.dataset == "mnist":
        fed = load_mnist_clients(num_clients=20, alpha=0.5, train_size=4000, test_size=1000, seed=0)
    else:
        fed = load_femnist_clients(max_writers=20, min_samples=50, seed=0)
    n = len(fed.clients)
    hist = np.stack([np.bincount(c.y.numpy(), minlength=fed.num_classes) for c in fed.clients]).astype(float)
    share = hist / hist.sum(axis=1, keepdims=True)
    pooled = hist.sum(axis=0) / hist.sum()
    torch.manual_seed(0)
    model = SmallCNN(1, fed.num_classes)
    base = dict(num_clients=n, clients_per_round=7, local_epochs=2, lr=0.05, batch_size=32,
                algorithm=args.algorithm, mu=0.01, seed=0)  # fmt: skip
    warmup = WARMUP[args.dataset]
    calib = min(args.calibration_rounds, warmup)
    if warmup > calib:
        run_federated(model, fed.clients, FedConfig(rounds=warmup - calib, malicious_fraction=0.0, **base))
    rounds: list[tuple[str, int, list, list]] = []  # (phase, round, ids, deltas)
    residuals: dict[tuple[str, int, str], np.ndarray] = {}

    def recorder(phase):
        def record(m, deltas, weights, ids):
            rnd = len([r for r in rounds if r[0] == phase]) + 1
            rounds.append((phase, rnd, list(ids), deltas))
            with torch.no_grad():  # what the server cannot see: the global model's residual on the client's data
                for cid in ids:
                    data = fed.clients[cid]
                    p = torch.softmax(m(data.x), dim=1).double().numpy()
                    onehot = np.eye(fed.num_classes)[data.y.numpy()]
                    residuals[(phase, rnd, str(cid))] = (onehot - p).sum(axis=0)  # minus the bias gradient
            return []

        return record

    run_screened_federated(model, fed.clients, FedConfig(rounds=calib, malicious_fraction=0.0, **base),
                           screens={"r": recorder("calibration")}, round_offset=warmup - calib)  # fmt: skip
    attack = ATTACKS.build("model_replacement_constrained", seed=0, local_epochs=10, **RECIPE_PARAMS)
    config = FedConfig(rounds=10, malicious_fraction=3 / n, attack_rounds=tuple(range(1, 11)), **base)
    run = run_screened_federated(model, fed.clients, config, attack=attack, target_label=0, defence=fedavg_defence,
                                 screens={"r": recorder("planted")}, round_offset=warmup)  # fmt: skip
    malicious = {str(c) for c in run.malicious_clients}
    print(f"trained in {time.perf_counter() - t0:.0f} s; malicious {sorted(malicious)}")
    if args.evidence:
        saved = next(iter(json.loads(args.evidence.read_text()).values()))
        got_cal = [[str(c) for c in ids] for ph, _, ids, _ in rounds if ph == "calibration"]
        got_att = [[str(c) for c in ids] for ph, _, ids, _ in rounds if ph == "planted"]
        want_att = [r["clients"] for r in saved["attacks"]["model_replacement_constrained_planted"]["rounds"]]
        print("client lists match the saved evidence:", got_cal == [r["clients"] for r in saved["calibration"]],
              got_att == want_att)  # fmt: skip
    rows = []
    for phase, rnd, ids, deltas in rounds:
        bias = np.stack([d["classifier.bias"].double().numpy() for d in deltas])  # (K, C)
        centred = bias - np.median(bias, axis=0)
        for k, cid in enumerate(ids):
            w = int(cid)
            over = share[w] - pooled
            norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in deltas[k].values()))
            corr = float(np.corrcoef(centred[k], over)[0, 1])
            top3 = set(np.argsort(-over)[:3].tolist())
            rows.append({
                "phase": phase, "round": rnd, "client": str(cid), "malicious": phase == "planted" and str(cid) in malicious,
                "norm": norm, "corr": corr, "argmax_bias": int(centred[k].argmax()),
                "argmax_in_top3_over": int(centred[k].argmax()) in top3,
                "bias_spread": float(np.std(bias[k])), "centred_bias": centred[k].round(5).tolist(),
                "residual": residuals[(phase, rnd, str(cid))].round(4).tolist(),
                "corr_residual": float(np.corrcoef(centred[k], residuals[(phase, rnd, str(cid))])[0, 1]),
            })  # fmt: skip
    benign = [r for r in rows if not r["malicious"]]
    print(f"benign updates: {len(benign)}; Pearson(centred bias delta, share − pooled): "
          f"median {np.median([r['corr'] for r in benign]):.2f}, IQR "
          f"{np.percentile([r['corr'] for r in benign], 25):.2f}-{np.percentile([r['corr'] for r in benign], 75):.2f}; "
          f"argmax in the client's top-3 over-represented classes: "
          f"{sum(r['argmax_in_top3_over'] for r in benign)}/{len(benign)}")  # fmt: skip
    print(f"Pearson(centred bias delta, the global model's residual Σ(onehot − p) on the client's data): median "
          f"{np.median([r['corr_residual'] for r in benign]):.2f}")  # fmt: skip
    norms = [r["norm"] for r in benign]
    print(f"benign update norms: median {np.median(norms):.3f}, 90th pct {np.percentile(norms, 90):.3f}, "
          f"max {max(norms):.3f}")  # fmt: skip
    print("| phase | round | client | malicious | norm | corr | argmax centred bias | bias-delta std |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["phase"] == "planted" and (r["malicious"] or r["client"] in ("13", "18")):
            print(f"| {r['phase']} | {r['round']} | {r['client']} | {r['malicious']} | {r['norm']:.3f} | "
                  f"{r['corr']:.2f} | {r['argmax_bias']} | {r['bias_spread']:.4f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
