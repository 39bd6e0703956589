"""Pilot 2 for a norm-constrained attacker that plants a backdoor (benchmarks/fl/README.md): training only, no
screen; MNIST, the benchmark's default setting, undefended FedAvg. Run as `python benchmarks/fl/pilot/constrained_pilot_2.py
fedavg`; prints (norm bound, epochs / attackers, ...) and [(rounds, clean accuracy, ASR)]. Its output is the .log beside it."""

import math
import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"
import torch

torch.set_num_threads(1)
from metashield_hf.attacks import ATTACKS  # noqa: E402
from metashield_hf.fl.data import load_mnist_clients  # noqa: E402
from metashield_hf.fl.federation import FedConfig, run_federated  # noqa: E402
from metashield_hf.fl.screen import flatten  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN, evaluate, fedavg_defence, run_screened_federated  # noqa: E402

fed = load_mnist_clients(num_clients=20, alpha=0.5, train_size=4000, test_size=1000, seed=0)
test = type(fed.test)(fed.test.x[10:], fed.test.y[10:])
torch.manual_seed(0)
model = SmallCNN(1, 10)
algo = sys.argv[1] if len(sys.argv) > 1 else "fedavg"
base = dict(
    num_clients=20, clients_per_round=7, local_epochs=2, lr=0.05, batch_size=32, algorithm=algo, mu=0.01, seed=0
)
run_federated(model, fed.clients, FedConfig(rounds=15, malicious_fraction=0.0, **base))
warm = {k: v.clone() for k, v in model.state_dict().items()}
print("warm", evaluate(model, test), flush=True)


def norms(model, deltas, w, ids):
    print("  norms", [round(math.sqrt(float(flatten(d) @ flatten(d))), 2) for d in deltas], ids, w, flush=True)
    return []


for m, bound, pf in [(3, 0.6, 0.5), (2, 0.6, 0.5), (3, None, 0.5)]:
    attack = ATTACKS.build(
        "model_replacement_constrained", seed=0, local_epochs=10, norm_bound=bound, poison_fraction=pf
    )
    asr = []
    for r in [5, 10]:
        model.load_state_dict(warm)
        c = FedConfig(rounds=r, malicious_fraction=m / 20, attack_rounds=tuple(range(1, r + 1)), **base)
        run = run_screened_federated(
            model,
            fed.clients,
            c,
            attack=attack,
            target_label=0,
            defence=fedavg_defence,
            screens={"n": norms} if r == 5 else None,
            round_offset=15,
        )
        e = evaluate(model, test, attack=attack, target_label=0)
        asr.append((r, round(e["clean_accuracy"], 3), round(e["asr"], 3)))
    print(m, bound, pf, "malicious", run.malicious_clients, asr, flush=True)
