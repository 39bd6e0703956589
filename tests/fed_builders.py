"""Builders of the federated tests (simulator and fl attacks): a tiny CNN with a BatchNorm, random 8x8 client data,
a small FedConfig and an fl attack with a BadNets trigger, all seeded."""

from __future__ import annotations

import torch
from torch import nn

from metashield_hf.attacks import ATTACKS
from metashield_hf.fl.data import ClientData
from metashield_hf.fl.federation import FedConfig


def fed_model(seed: int = 0) -> nn.Module:
    """A tiny CNN with a BatchNorm (buffers that move in train mode) and four parameter-owning modules."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),  # 0
            nn.BatchNorm2d(4),  # 1
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 16),  # 4
            nn.ReLU(),
            nn.Linear(16, 4),  # 6
        )


def fed_data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 4


def fed_clients(num: int = 8, size: int = 24) -> list[ClientData]:
    return [ClientData(*fed_data(size, seed=k)) for k in range(num)]


def fed_config(**overrides) -> FedConfig:
    base = dict(num_clients=8, clients_per_round=4, rounds=4, local_epochs=1, lr=0.1, batch_size=8)
    base.update(malicious_fraction=0.25, attack_rounds=(3, 4), seed=1)
    return FedConfig(**{**base, **overrides})


def fed_attack(name: str, seed: int = 0) -> object:
    kwargs = {"trigger": "badnets", "trigger_params": {"patch_size": 2}, "poison_fraction": 0.5, "seed": seed}
    if name == "model_replacement_constrained":
        kwargs["norm_bound"] = 0.5
    return ATTACKS.build(name, **kwargs)
