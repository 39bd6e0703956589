"""Pilots for a norm-constrained attacker that plants a backdoor (benchmarks/fl/README.md): training only, no screen;
MNIST, the benchmark's default setting (20 Dirichlet clients, 7 per round, 15 benign warm-up rounds), undefended.

Each pilot is a grid of attacker recipes (`model_replacement_constrained`, 10 local epochs unless the grid says
otherwise) run for a few attacked rounds from the same warm model; it prints the warm model's accuracy, then per
recipe ``(recipe..., "malicious", ids, [(rounds, clean accuracy, ASR), ...])``, and with ``--norms`` the update norms
of every client in the first attacked round of the shortest run. The output of each pilot is
``constrained_pilot_N.log`` beside this file (pilots 1 and 2 ran with ``--norms``; the logs were written before
the three pilots became this one script, whose grids are theirs verbatim).

    python benchmarks/fl/pilot/constrained_pilot.py --pilot 3 --algorithm fedavg
"""

import argparse
import math
import os

os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

from metashield_hf.attacks import ATTACKS  # noqa: E402
from metashield_hf.fl.data import load_mnist_clients  # noqa: E402
from metashield_hf.fl.federation import FedConfig, run_federated  # noqa: E402
from metashield_hf.fl.screen import flatten  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN, evaluate, fedavg_defence, run_screened_federated  # noqa: E402

CHECKER_4 = (("patch_size", 4), ("pattern", "checkerboard"))
CHECKER_8 = (("patch_size", 8), ("pattern", "checkerboard"))
#: Per pilot: the attacked-round counts, and the recipes as (attackers of 20, norm bound, local epochs, poisoned
#: share of the attacker's rows, trigger parameters or None for the attack's default).
PILOTS = {
    1: (
        [3, 5, 10],
        [(1, None, 10, 0.5, None), (1, 0.5, 10, 0.5, None), (1, 0.6, 20, 0.5, None), (1, 0.6, 10, 1.0, None)],
    ),
    2: ([5, 10], [(3, 0.6, 10, 0.5, None), (2, 0.6, 10, 0.5, None), (3, None, 10, 0.5, None)]),
    3: (
        [5, 10, 20],
        [
            (3, 0.6, 10, 1.0, CHECKER_4),
            (3, 0.6, 10, 0.5, CHECKER_8),
            (3, 0.6, 10, 1.0, CHECKER_8),
            (2, 0.6, 10, 1.0, CHECKER_8),
        ],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilot", type=int, choices=sorted(PILOTS), required=True)
    parser.add_argument("--algorithm", default="fedavg", choices=["fedavg", "fedprox"])
    parser.add_argument("--norms", action="store_true", help="print the first attacked round's update norms")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fed = load_mnist_clients(num_clients=20, alpha=0.5, train_size=4000, test_size=1000, seed=0)
    test = type(fed.test)(fed.test.x[10:], fed.test.y[10:])
    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    base = dict(
        num_clients=20, clients_per_round=7, local_epochs=2, lr=0.05, batch_size=32, algorithm=args.algorithm,
        mu=0.01, seed=0,
    )  # fmt: skip
    run_federated(model, fed.clients, FedConfig(rounds=15, malicious_fraction=0.0, **base))
    warm = {k: v.clone() for k, v in model.state_dict().items()}
    print("warm", evaluate(model, test), flush=True)

    def norms(model, deltas, weights, ids):
        print("  norms", [round(math.sqrt(float(flatten(d) @ flatten(d))), 2) for d in deltas], ids, flush=True)
        return []

    rounds, recipes = PILOTS[args.pilot]
    for attackers, bound, epochs, share, trigger in recipes:
        extra = {"trigger_params": trigger} if trigger else {}
        attack = ATTACKS.build(
            "model_replacement_constrained", seed=0, local_epochs=epochs, norm_bound=bound, poison_fraction=share,
            **extra,
        )  # fmt: skip
        results = []
        for r in rounds:
            model.load_state_dict(warm)
            config = FedConfig(
                rounds=r, malicious_fraction=attackers / 20, attack_rounds=tuple(range(1, r + 1)), **base
            )
            run = run_screened_federated(
                model, fed.clients, config, attack=attack, target_label=0, defence=fedavg_defence,
                screens={"n": norms} if args.norms and r == rounds[0] else None, round_offset=15,
            )  # fmt: skip
            e = evaluate(model, test, attack=attack, target_label=0)
            results.append((r, round(e["clean_accuracy"], 3), round(e["asr"], 3)))
        print(attackers, bound, epochs, share, trigger, "malicious", run.malicious_clients, results, flush=True)


if __name__ == "__main__":
    main()
