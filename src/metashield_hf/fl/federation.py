"""Federated learning in one process: FedAvg/FedProx rounds over clients, with malicious clients when an ``fl``
attack is given.

The simulation is deliberately small and fast (one process, one model object reused by every client) but its
server step is Flower's: :func:`fedavg_aggregate` is the num-examples-weighted mean that
``flwr.serverapp.strategy.FedAvg.aggregate_train`` computes, and FedProx only changes the client loss
(Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127), exactly as in Flower.

Malicious clients build their update with the attack's ``malicious_update`` from a
``metashield_hf.attacks.federated.MaliciousContext``; the zoo (``zoo/fl.py``) saves the global model a run ends with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import check_choice, check_float, check_int, jsonable
from ..attacks.federated import FederatedAttack, MaliciousContext, StateDict, update_norm
from .data import ClientData

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass
class FedConfig:
    """Settings of one federated training run.

    Args:
        num_clients: clients in the federation (for a natural partition: the number of writers).
        clients_per_round: clients sampled each round (seeded by ``(seed, round)``).
        rounds: training rounds; the global model after this round is the one a zoo saves.
        local_epochs: epochs of local SGD per selected client.
        lr: client SGD learning rate (no momentum, no weight decay, so masked coordinates stay exactly fixed).
        batch_size: client batch size.
        algorithm: ``"fedavg"`` or ``"fedprox"`` (adds ``mu / 2 * ||w - w_global||²`` to the client loss).
        mu: FedProx proximal weight.
        server_lr: η, the server step on the averaged update (``1.0`` is Flower's FedAvg).
        partition: ``"dirichlet"`` (label-skewed non-IID split, :func:`dirichlet_partition`) or ``"natural"``.
        dirichlet_alpha: α of the Dirichlet split (smaller = more skewed).
        malicious_fraction: fraction of clients that are malicious (at least one when an attack is run).
        attack_rounds: 1-based rounds in which malicious clients take part and attack; ``None`` = the last half of
            ``rounds``. In those rounds every malicious client is selected (the fixed-frequency setting of DBA).
        durability_rounds: attack-free rounds run after ``rounds`` to measure how long the backdoor lasts.
        seed: seeds client sampling, malicious-client choice and local batch order.
    """

    num_clients: int = 20
    clients_per_round: int = 5
    rounds: int = 10
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    algorithm: str = "fedavg"
    mu: float = 0.01
    server_lr: float = 1.0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    malicious_fraction: float = 0.1
    attack_rounds: tuple[int, ...] | None = None
    durability_rounds: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("num_clients", self.num_clients, minimum=1)
        check_int("clients_per_round", self.clients_per_round, minimum=1)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} > num_clients={self.num_clients}")
        for name in ("rounds", "local_epochs", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("durability_rounds", self.durability_rounds, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_choice("algorithm", self.algorithm, ("fedavg", "fedprox"))
        check_choice("partition", self.partition, ("dirichlet", "natural"))
        for name in ("lr", "mu", "server_lr", "dirichlet_alpha"):
            check_float(name, getattr(self, name), 0.0)
        check_float("malicious_fraction", self.malicious_fraction, 0.0, 1.0)
        if self.attack_rounds is not None:
            self.attack_rounds = tuple(int(r) for r in self.attack_rounds)
            bad = [r for r in self.attack_rounds if not 1 <= r <= self.rounds]
            if bad:
                raise ValueError(
                    f"attack_rounds {bad} outside 1..rounds={self.rounds}; attacks end by the saved round"
                )

    @property
    def resolved_attack_rounds(self) -> tuple[int, ...]:
        if self.attack_rounds is not None:
            return tuple(sorted(set(self.attack_rounds)))
        return tuple(range(self.rounds // 2 + 1, self.rounds + 1))

    def to_dict(self) -> dict[str, Any]:
        return {k: jsonable(v) for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------------- server & client
def fedavg_aggregate(arrays: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[float]) -> StateDict:
    """FedAvg: the mean of the clients' arrays weighted by their number of examples.

    The same arithmetic as Flower's ``FedAvg.aggregate_train`` (weights ``n_k / Σ n``), on models or on deltas
    (with ``server_lr = 1`` the two give the same new global model).

    Args:
        arrays: one ``name -> tensor`` mapping per client, all with the same keys and shapes.
        num_examples: ``n_k`` per client.

    Returns:
        ``name -> Σ_k n_k a_k / Σ_k n_k`` (float tensors keep their dtype; integer tensors are rounded back).

    Example:
        ```python
        fedavg_aggregate([{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}], [1, 3])   # {"w": tensor([2.5])}
        ```
    """
    if not arrays or len(arrays) != len(num_examples):
        raise ValueError(f"need one num_examples per client, got {len(arrays)} arrays and {len(num_examples)} counts")
    weights = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"num_examples must be >= 0 with a positive sum, got {list(num_examples)}")
    weights = weights / weights.sum()
    out: StateDict = {}
    for key, ref in arrays[0].items():
        total = sum(w * a[key].to(torch.float64) for w, a in zip(weights, arrays, strict=True))
        out[key] = total.to(ref.dtype) if ref.is_floating_point() else total.round().to(ref.dtype)
    return out


def local_train(
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    mu: float = 0.0,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grad_mask: Mapping[str, torch.Tensor] | None = None,
    trainable: Sequence[str] | None = None,
) -> StateDict:
    """One client's local SGD from ``global_state``; returns the update ``Δ = local − global`` (float entries).

    Args:
        model: a module whose state dict matches ``global_state`` (reused; its weights are overwritten).
        global_state: the round's global weights.
        x, y: local data, ``x`` in ``[0, 1]`` (``preprocess`` normalizes it).
        lr, epochs, batch_size: plain SGD (no momentum, no weight decay).
        generator: seeds the batch order.
        mu: FedProx proximal weight (0 = FedAvg client).
        grad_mask: ``name -> 0/1`` tensor multiplied into each gradient before every step (Neurotoxin's projection).
        trainable: names of the parameters to train (the rest stay fixed); default all.
    """
    model.load_state_dict(global_state)
    params = dict(model.named_parameters())
    names = list(params) if trainable is None else list(trainable)
    missing = sorted(set(names) - set(params))
    if missing:
        raise ValueError(f"trainable parameters {missing} are not in the model")
    anchor = {n: global_state[n].detach() for n in names} if mu > 0 else {}
    for n, p in params.items():
        p.requires_grad_(n in names)
    opt = torch.optim.SGD([params[n] for n in names], lr=lr)
    model.train()
    try:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                b = order[start : start + batch_size]
                xb = preprocess(x[b]) if preprocess is not None else x[b]
                loss = F.cross_entropy(model(xb), y[b])
                if mu > 0:
                    loss = loss + mu / 2 * sum(((params[n] - anchor[n]) ** 2).sum() for n in names)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_mask is not None:
                    for n in names:
                        if n in grad_mask and params[n].grad is not None:
                            params[n].grad.mul_(grad_mask[n])
                opt.step()
    finally:
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
    new = model.state_dict()
    return {k: (new[k] - v).detach().clone() for k, v in global_state.items() if v.is_floating_point()}


@dataclass
class FedResult:
    """A finished run: the global state after ``config.rounds`` (``state``) and after the durability rounds.

    ``snapshots`` maps round → global state for the rounds asked for (always the last attack round, ``rounds``
    and the final round). ``history`` has one dict per round (selected and malicious clients, update norms).
    """

    state: StateDict
    final_state: StateDict
    snapshots: dict[int, StateDict]
    history: list[dict[str, Any]]
    malicious_clients: tuple[int, ...]
    attack_rounds: tuple[int, ...]
    seconds: float


def _clone(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def malicious_clients(config: FedConfig) -> tuple[int, ...]:
    """The malicious clients of a run: ``round(malicious_fraction * num_clients)`` (at least 1), seeded by ``seed``."""
    count = min(config.num_clients, max(1, round(config.malicious_fraction * config.num_clients)))
    picked = np.random.default_rng([config.seed, 7919]).choice(config.num_clients, size=count, replace=False)
    return tuple(sorted(int(c) for c in picked))


def train_round(
    model: nn.Module,
    clients: Sequence[ClientData],
    config: FedConfig,
    global_state: StateDict,
    *,
    round_index: int,
    seed_round: int,
    attacking: bool,
    malicious: tuple[int, ...],
    attack: FederatedAttack | None,
    target_label: int,
    reference: StateDict | None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[StateDict], list[int], list[int], list[int]]:
    """One round's client side: sample the clients and return their updates.

    Clients are sampled by ``(seed, seed_round)``; in an attack round every malicious client takes part and benign
    ones fill the remaining seats in sampled order. Each client trains from ``global_state`` with its own seeded
    generator; malicious ones call ``attack.malicious_update``.

    Returns:
        ``(updates, num_examples, client_ids, attackers)`` (clients without data are skipped).
    """
    mu = config.mu if config.algorithm == "fedprox" else 0.0
    sampled = np.random.default_rng([config.seed, seed_round]).permutation(config.num_clients).tolist()
    if attacking:
        chosen = list(malicious[: config.clients_per_round])
        chosen += [c for c in sampled if c not in malicious][: config.clients_per_round - len(chosen)]
    else:
        chosen = sampled[: config.clients_per_round]
    attackers = [c for c in chosen if attacking and c in malicious]
    updates, weights, ids = [], [], []
    for cid in chosen:
        data = clients[cid]
        if len(data) == 0:
            continue
        gen = torch.Generator().manual_seed(int(np.random.default_rng([config.seed, seed_round, cid]).integers(2**62)))

        def train(x, y, *, epochs=None, grad_mask=None, trainable=None, lr=None, _gen=gen):
            return local_train(
                model, global_state, x, y, lr=lr or config.lr, epochs=epochs or config.local_epochs,
                batch_size=config.batch_size, generator=_gen, mu=mu, preprocess=preprocess,
                grad_mask=grad_mask, trainable=trainable,
            )  # fmt: skip

        if cid in attackers:
            ctx = MaliciousContext(
                client_id=cid, rank=malicious.index(cid), num_attackers=len(malicious), round=round_index, x=data.x,
                y=data.y, target_label=target_label, num_selected=len(chosen), num_malicious=len(attackers),
                server_lr=config.server_lr, model=model, global_state=global_state, reference_update=reference,
                train=train, generator=gen,
            )  # fmt: skip
            updates.append(attack.malicious_update(ctx))
        else:
            updates.append(train(data.x, data.y))
        weights.append(len(data))
        ids.append(cid)
    return updates, weights, ids, attackers


def run_federated(
    model: nn.Module,
    clients: Sequence[ClientData],
    config: FedConfig,
    *,
    attack: FederatedAttack | None = None,
    target_label: int = 0,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    snapshot_rounds: Sequence[int] = (),
) -> FedResult:
    """Train ``model`` by FedAvg/FedProx over ``clients``, with malicious clients if ``attack`` is given.

    Same seed, same clients → same global model, whether an attack is run or not up to the first attack round
    (client sampling is seeded by ``(seed, round)`` only).

    Args:
        model: the initial global model (its weights are the round-0 state; it ends holding ``state``).
        clients: one :class:`ClientData` per client; ``len(clients)`` must equal ``config.num_clients``.
        config: the run.
        attack: an ``fl`` attack; ``None`` trains a clean model.
        target_label: the backdoor target class.
        preprocess: applied to every input batch (e.g. normalization); triggers are applied before it.
        snapshot_rounds: extra rounds whose global state to keep.

    Returns:
        A :class:`FedResult`.
    """
    if len(clients) != config.num_clients:
        raise ValueError(f"config.num_clients={config.num_clients} but {len(clients)} clients were given")
    start = time.perf_counter()
    attack_rounds = config.resolved_attack_rounds if attack is not None else ()
    malicious = malicious_clients(config) if attack is not None else ()
    total = config.rounds + config.durability_rounds
    keep = set(snapshot_rounds) | {config.rounds, total} | ({max(attack_rounds)} if attack_rounds else set())
    global_state = _clone(model.state_dict())
    snapshots: dict[int, StateDict] = {}
    history: list[dict[str, Any]] = []
    reference: StateDict | None = None
    for rnd in range(1, total + 1):
        updates, weights, ids, attackers = train_round(
            model, clients, config, global_state, round_index=rnd, seed_round=rnd, attacking=rnd in attack_rounds,
            malicious=malicious, attack=attack, target_label=target_label, reference=reference, preprocess=preprocess,
        )  # fmt: skip
        norms = {cid: update_norm(u) for cid, u in zip(ids, updates, strict=True)}
        chosen = ids
        update = fedavg_aggregate(updates, weights)
        global_state = {
            k: (v + config.server_lr * update[k]).to(v.dtype) if k in update else v for k, v in global_state.items()
        }
        reference = update
        history.append({"round": rnd, "clients": chosen, "malicious": attackers, "update_norms": norms})
        if rnd in keep:
            snapshots[rnd] = _clone(global_state)
        logger.debug("round %d: clients %s, malicious %s", rnd, chosen, attackers)
    model.load_state_dict(snapshots[config.rounds])
    return FedResult(
        state=snapshots[config.rounds], final_state=snapshots[total], snapshots=snapshots, history=history,
        malicious_clients=malicious, attack_rounds=attack_rounds, seconds=time.perf_counter() - start,
    )  # fmt: skip
