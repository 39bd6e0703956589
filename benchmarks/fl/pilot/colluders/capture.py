"""Capture MNIST rounds (calibration + attack) for offline evidence pilots."""

import os
import sys

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from metashield_hf.attacks import ATTACKS
from metashield_hf.fl.data import load_mnist_clients
from metashield_hf.fl.federation import FedConfig, run_federated
from metashield_hf.fl.simulate import SmallCNN, evaluate, fedavg_defence, run_screened_federated

# the planted norm-constrained recipe, as benchmarks/fl/run.py's RECIPES defines it (scripts never import each other);
# any other name is a registry attack with run.py's defaults (1 attacker, 3 rounds)
RECIPES = {
    "model_replacement_constrained_planted": (
        "model_replacement_constrained",
        {"norm_bound": 0.6, "trigger_params": {"patch_size": 8, "pattern": "checkerboard"}},
        {"malicious": 3, "rounds": 10},
    ),
}
torch.set_num_threads(1)
alg = sys.argv[1]
attacks = sys.argv[2:]
fed = load_mnist_clients(num_clients=20, alpha=0.5, train_size=4000, test_size=1000, seed=0)
clean = fed.test.x[:10]
torch.manual_seed(0)
model = SmallCNN(1, 10)
base = dict(
    num_clients=20, clients_per_round=7, local_epochs=2, lr=0.05, batch_size=32, algorithm=alg, mu=0.01, seed=0
)
run_federated(model, fed.clients, FedConfig(rounds=10, malicious_fraction=0.0, **base))
cap = []


def rec(m, d, w, ids):
    cap.append(({k: v.clone() for k, v in m.state_dict().items()}, [dict(x) for x in d], list(ids)))
    return []


run_screened_federated(
    model, fed.clients, FedConfig(rounds=5, malicious_fraction=0.0, **base), screens={"c": rec}, round_offset=10
)
warm = {k: v.clone() for k, v in model.state_dict().items()}
out = {"calib": cap, "clean": clean, "attacks": {}}
for name in attacks:
    registered, params, over = RECIPES.get(name, (name, {}, {}))
    attack = ATTACKS.build(registered, **{"seed": 0, "local_epochs": 10, **params})
    rounds, mal = over.get("rounds", 3), over.get("malicious", 1)
    cfg = FedConfig(rounds=rounds, malicious_fraction=mal / 20, attack_rounds=tuple(range(1, rounds + 1)), **base)
    cap = []
    model.load_state_dict(warm)
    run = run_screened_federated(
        model,
        fed.clients,
        cfg,
        attack=attack,
        target_label=0,
        defence=fedavg_defence,
        screens={"c": rec},
        round_offset=15,
    )
    ev = evaluate(model, type(fed.test)(fed.test.x[10:], fed.test.y[10:]), attack=attack, target_label=0)
    out["attacks"][name] = {"rounds": cap, "malicious": list(run.malicious_clients), "eval": ev}
    print(name, ev, flush=True)
torch.save(out, f"artifacts/amp/cap_{alg}.pt")
