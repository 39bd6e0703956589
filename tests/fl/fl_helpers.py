"""Shared helpers of the FL tests (imported by path-free name; tests/fl has no conftest of its own)."""

from __future__ import annotations

import functools

import torch

from metashield_hf.fl.data import ClientData, dirichlet_partition
from metashield_hf.fl.federation import FedConfig, run_federated
from metashield_hf.fl.simulate import SmallCNN


def digits_federation(num_clients: int = 8, seed: int = 0):
    """sklearn digits upsampled to 28x28 (N, 1, 28, 28) in [0, 1], Dirichlet(1.0) over ``num_clients``; a held-out
    pool of 200 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:200], perm[200:]
    parts = dirichlet_partition(y[train].numpy(), num_clients, 1.0, seed=seed)
    clients = [ClientData(x[train][torch.from_numpy(p)], y[train][torch.from_numpy(p)]) for p in parts]
    return clients, ClientData(x[test], y[test])


def warm_global(clients, rounds: int = 12, seed: int = 0) -> SmallCNN:
    """A global model after ``rounds`` benign FedAvg rounds (seeded)."""
    torch.manual_seed(seed)
    model = SmallCNN()
    config = FedConfig(
        num_clients=len(clients),
        clients_per_round=len(clients),
        rounds=rounds,
        local_epochs=2,
        lr=0.1,
        batch_size=16,
        seed=seed,
    )
    run_federated(model, clients, config)
    return model


@functools.lru_cache(maxsize=1)
def screened_round(seed: int = 0):
    """One round on digits: a warm global model, 4 benign client updates and one malicious (BadNets data poisoning,
    half its data, 4 local epochs) at index 2. Returns ``(global_model, deltas, num_examples, clean_pool, attack)``.
    Cached: several test files share it."""
    from metashield_hf.attacks import FLDataPoisoning
    from metashield_hf.fl.federation import local_train

    clients, test = digits_federation(num_clients=5, seed=seed)
    model = warm_global(clients, seed=seed)
    g = {k: v.clone() for k, v in model.state_dict().items()}
    work = SmallCNN()
    attack = FLDataPoisoning(poison_fraction=0.5, seed=seed)
    deltas = []
    for cid, data in enumerate(clients):
        gen = torch.Generator().manual_seed(seed * 100 + cid)
        x, y, epochs = data.x, data.y, 2
        if cid == MALICIOUS:
            x, y = attack.poison_local(x, y, 0, client_id=cid)
            epochs = 4
        deltas.append(local_train(work, g, x, y, lr=0.1, epochs=epochs, batch_size=16, generator=gen))
    return model, deltas, [len(c) for c in clients], test.x, attack


MALICIOUS = 2


def planted_evidence(values, signal: str = "trigger_drift"):
    """A ``ClientEvidence`` whose raw and centred values of ``signal`` are ``values`` (one row per client)."""
    import numpy as np

    from metashield_hf.fl import ClientEvidence

    values = np.asarray(values, dtype=np.float64)
    k = len(values)
    return ClientEvidence({signal: values}, {signal: values}, None, np.ones(k), np.zeros(k))


def class_row(v: float) -> list[float]:
    """Classes (v, 0, -v): the candidate's median over classes is 0, so centring leaves the row as it is."""
    return [v, 0.0, -v]
