"""An in-process FL loop with a pluggable server defence, for benchmarking client screens on real rounds.

It is ``fl.federation.run_federated`` (same client sampling, same malicious clients, same ``MaliciousContext``, same
local training, same FedAvg arithmetic) with two hooks per round: ``screens`` score the round's updates for the
record (every screen sees the same replies), and ``defence`` turns the updates into the next global model (FedAvg
over the kept clients, or a Flower strategy's ``aggregate_train``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attacks.federated import FederatedAttack, StateDict
from .data import ClientData
from .federation import FedConfig, fedavg_aggregate, malicious_clients, train_round
from .screen import ClientScore

logger = logging.getLogger(__name__)

# screen(global_model, deltas, num_examples, client_ids) -> one ClientScore per update
Screen = Callable[[nn.Module, list[StateDict], list[int], list[int]], list[ClientScore]]
# defence(global_model, deltas, num_examples, client_ids) -> (aggregated delta, kept client ids or None, info)
Defence = Callable[[nn.Module, list[StateDict], list[int], list[int]], tuple[StateDict, list[int] | None, dict]]


class SmallCNN(nn.Module):
    """LeNet-5-style CNN for ``(N, C, 28, 28)`` inputs in ``[0, 1]`` (MNIST, FEMNIST): learns in a few FedAvg rounds
    with plain SGD, about 1.1 M multiply-adds per image. The penultimate layer is ``fc``'s output, the head
    ``classifier`` (found by the scan's head rule)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Linear(2 * width * 16, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.features(x)))


def fedavg_defence(model: nn.Module, deltas, weights, ids) -> tuple[StateDict, list[int] | None, dict]:
    """No defence: Flower's FedAvg (num-examples-weighted mean) of every update."""
    return fedavg_aggregate(deltas, weights), None, {}


def screen_defence(screen: Screen, *, action: str = "drop", downweight: float = 0.1) -> Defence:
    """FedAvg over the clients a screen does not flag (``"drop"``), or with their weight times ``downweight``."""
    if action not in ("drop", "downweight"):
        raise ValueError(f"action must be 'drop' or 'downweight', got {action!r}")

    def defence(model, deltas, weights, ids):
        t0 = time.perf_counter()
        scores = screen(model, deltas, weights, ids)
        flagged = {s.client for s in scores if s.flagged}
        seconds = time.perf_counter() - t0
        if action == "drop":
            keep = [i for i, c in enumerate(ids) if c not in flagged] or list(range(len(ids)))
            agg = fedavg_aggregate([deltas[i] for i in keep], [weights[i] for i in keep])
            kept = [ids[i] for i in keep]
        else:
            w = [wt * (downweight if c in flagged else 1.0) for wt, c in zip(weights, ids, strict=True)]
            agg, kept = fedavg_aggregate(deltas, w), [c for c in ids if c not in flagged]
        return agg, kept, {"scores": scores, "screen_seconds": seconds}

    return defence


@dataclass
class RoundLog:
    """One round: who took part, who attacked, what each screen said, and the timings."""

    round: int
    clients: list[int]
    malicious: list[int]
    kept: list[int] | None
    train_seconds: float
    defence_seconds: float
    screens: dict[str, list[ClientScore]] = field(default_factory=dict)
    screen_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class ScreenedRun:
    """A finished run: final global state and the per-round logs."""

    state: StateDict
    rounds: list[RoundLog]
    malicious_clients: tuple[int, ...]
    attack_rounds: tuple[int, ...]
    seconds: float


def run_screened_federated(
    model: nn.Module,
    clients: Sequence[ClientData],
    config: FedConfig,
    *,
    attack: FederatedAttack | None = None,
    target_label: int = 0,
    defence: Defence = fedavg_defence,
    screens: dict[str, Screen] | None = None,
    round_offset: int = 0,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ScreenedRun:
    """FedAvg/FedProx rounds from ``model``'s weights with a server ``defence`` and recorded ``screens``.

    Args:
        model: the starting global model (e.g. after benign warm-up rounds); it ends holding the final state.
        clients: one [`ClientData`] per client (``len == config.num_clients``).
        config: the run (``rounds``, ``attack_rounds``, ``malicious_fraction``, ``seed``, ...), as in
            ``run_federated``; the malicious clients are the ones ``run_federated`` would pick for the same seed.
        attack: an ``fl`` attack, or ``None``.
        target_label: the backdoor target.
        defence: aggregates the round's updates (default: plain FedAvg).
        screens: name -> screen run on every round's updates for the record only.
        round_offset: added to the round number in the sampling seeds (continue after ``round_offset`` warm-up
            rounds without re-drawing the same clients).
        preprocess: applied to every input batch.

    Returns:
        A [`ScreenedRun`].
    """
    if len(clients) != config.num_clients:
        raise ValueError(f"config.num_clients={config.num_clients} but {len(clients)} clients were given")
    start = time.perf_counter()
    attack_rounds = config.resolved_attack_rounds if attack is not None else ()
    malicious = malicious_clients(config) if attack is not None else ()  # the same draw as run_federated
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    work = _clone_module(model)
    logs: list[RoundLog] = []
    reference: StateDict | None = None
    for rnd in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        deltas, weights, ids, attackers = train_round(
            work, clients, config, global_state, round_index=rnd, seed_round=round_offset + rnd,
            attacking=rnd in attack_rounds, malicious=malicious, attack=attack, target_label=target_label,
            reference=reference, preprocess=preprocess,
        )  # fmt: skip
        t_train = time.perf_counter() - t0
        model.load_state_dict(global_state)
        model.eval()
        recorded, screen_seconds = {}, {}
        for name, screen in (screens or {}).items():
            t1 = time.perf_counter()
            recorded[name] = screen(model, deltas, weights, ids)
            screen_seconds[name] = time.perf_counter() - t1
        t1 = time.perf_counter()
        update, kept, info = defence(model, deltas, weights, ids)
        t_def = time.perf_counter() - t1
        if "scores" in info:
            recorded.setdefault("_defence", info["scores"])
        global_state = {
            k: (v + config.server_lr * update[k]).to(v.dtype) if k in update else v for k, v in global_state.items()
        }
        reference = update
        logs.append(RoundLog(rnd, ids, attackers, kept, t_train, t_def, recorded, screen_seconds))
        logger.info("round %d: clients %s, malicious %s, kept %s (%.1f s train, %.1f s defence)",
                    rnd, ids, attackers, kept, t_train, t_def)  # fmt: skip
    model.load_state_dict(global_state)
    return ScreenedRun(global_state, logs, malicious, attack_rounds, time.perf_counter() - start)


def _clone_module(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    test: ClientData,
    *,
    attack: FederatedAttack | None = None,
    target_label: int = 0,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Clean accuracy on ``test`` and, with ``attack``, the ASR of its whole trigger on the non-target samples."""
    model.eval()

    def predict(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            outs.append(model(preprocess(xb) if preprocess else xb).argmax(-1))
        return torch.cat(outs)

    out: dict[str, Any] = {"clean_accuracy": float((predict(test.x) == test.y).float().mean())}
    if attack is not None:
        keep = test.y != target_label
        out["asr"] = float((predict(attack.apply(test.x[keep])) == target_label).float().mean())
    return out
