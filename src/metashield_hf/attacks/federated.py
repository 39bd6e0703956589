"""The backdoor attacks of the federated-learning literature (registry domain ``"fl"``).

Each attack is a frozen dataclass registered in ``ATTACKS`` with ``domain = "fl"``: every malicious client trains on
local data of which a fraction carries a vision trigger (a cv attack given by name and parameters, e.g. BadNets),
relabelled to the target; the attacks differ in what they do to the resulting update:

| name | paper | malicious update |
|---|---|---|
| ``fl_data_poisoning`` | Tolpegin et al. 2020 / Bagdasaryan et al. 2020 (baseline) | plain local training on poisoned data |
| ``dba`` | Xie et al., ICLR 2020, https://openreview.net/forum?id=rkgyS0VFvr | each client poisons with its own part of the trigger |
| ``model_replacement`` | Bagdasaryan et al., AISTATS 2020, https://arxiv.org/abs/1807.00459 | scaled by γ = n / η |
| ``model_replacement_constrained`` | same paper, "constrain-and-scale" | scaled, then projected onto an L2 ball |
| ``neurotoxin`` | Zhang et al., ICML 2022, https://arxiv.org/abs/2206.10341 | only coordinates benign updates change least |
| ``targeted_weight_modification`` | — | only the last layers edited, scaled to survive averaging |

The federated simulator (``metashield_hf.fl.federation.run_federated``) builds a :class:`MaliciousContext` for each
malicious client it samples and submits what :meth:`FederatedAttack.malicious_update` returns. The context is defined
here, beside the attacks that read it, so the attacks do not depend on the simulator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .base import ATTACKS, Attack, check_float, check_int, jsonable, normalise

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ what an attacker sees
def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update, all float tensors flattened together (what norm-clipping defences measure)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


@dataclass
class MaliciousContext:
    """What a malicious client knows when it builds its update (passed to ``FederatedAttack.malicious_update``).

    ``rank`` is the client's index among all ``num_attackers`` malicious clients.
    ``train(x, y, *, epochs=None, grad_mask=None, trainable=None, lr=None) -> Δ`` runs the client's normal local training
    from the global model on any data. ``reference_update`` is the previous round's aggregated update (``None`` in
    the first round): Neurotoxin's estimate of where benign clients move.
    """

    client_id: int
    rank: int
    num_attackers: int
    round: int
    x: torch.Tensor
    y: torch.Tensor
    target_label: int
    num_selected: int
    num_malicious: int
    server_lr: float
    model: nn.Module
    global_state: StateDict
    reference_update: StateDict | None
    train: Callable[..., StateDict]
    generator: torch.Generator


# ----------------------------------------------------------------------------------------------------------- attacks
def _pairs(params: Any) -> tuple[tuple[str, Any], ...]:
    """Trigger parameters as sorted ``(key, value)`` pairs: hashable, and equal after a JSON round trip."""
    items = params.items() if isinstance(params, Mapping) else params
    return tuple(sorted((str(k), normalise(v)) for k, v in items))


@dataclass(frozen=True)
class FederatedAttack(Attack):
    """Base of the ``fl`` attacks: malicious clients train on data carrying a vision trigger.

    Args:
        seed: seeds the trigger (unless ``trigger_params`` has its own ``seed``) and which local samples are poisoned.
        trigger: name of a ``cv`` attack in ``ATTACKS`` (``"badnets"``, ``"blend"``, …).
        trigger_params: its settings (a dict; stored as sorted pairs so the attack stays hashable).
        poison_fraction: fraction of a malicious client's local samples (among those whose label is not the
            target) that are triggered and relabelled.
        local_epochs: local epochs of the malicious clients (``None``: the run's ``local_epochs``).

    Subclasses change :meth:`transform_update` (what is done to the update) or :meth:`malicious_update`.
    """

    domain: ClassVar[str] = "fl"

    trigger: str = "badnets"
    trigger_params: Any = (("patch_size", 4), ("pattern", "checkerboard"))
    poison_fraction: float = 0.5
    local_epochs: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("trigger_params", _pairs(self.trigger_params))
        check_float("poison_fraction", self.poison_fraction, 0.0, 1.0)
        if self.local_epochs is not None:
            check_int("local_epochs", self.local_epochs, minimum=1)
        if self.trigger not in ATTACKS or ATTACKS.get(self.trigger).domain != "cv":
            cv = [n for n, cls in ATTACKS.items() if cls.domain == "cv"]
            raise ValueError(f"trigger={self.trigger!r} must be a cv attack, one of {cv}")
        _ = self.trigger_attack  # fail at construction on bad trigger parameters

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["trigger_params"] = {k: jsonable(v) for k, v in self.trigger_params}
        return out

    @cached_property
    def trigger_attack(self) -> Attack:
        """The vision attack whose trigger the malicious clients use (and :meth:`apply` applies)."""
        params = dict(self.trigger_params)
        params.setdefault("seed", self.seed)
        return ATTACKS.get(self.trigger)(**params)

    @property
    def seed_dependent(self) -> bool:
        return "seed" not in dict(self.trigger_params) and self.trigger_attack.seed_dependent

    def apply(self, inputs: Any) -> Any:
        """Apply the whole trigger (what the global model is tested with): any input type the cv attack takes."""
        return self.trigger_attack.apply(inputs)

    def poison(self, dataset, rate: float, target: int, **kwargs: Any):
        """Poison an image dataset with the trigger (see ``Attack.poison``); delegates to the cv trigger attack."""
        return self.trigger_attack.poison(dataset, rate, target, **kwargs)

    # ------------------------------------------------------------------ the simulation's hooks
    def client_trigger(self, x: torch.Tensor, rank: int = 0, num_attackers: int = 1) -> torch.Tensor:
        """The trigger malicious client ``rank`` (of ``num_attackers``) puts on its ``(N, C, H, W)`` data: all of it."""
        return self.trigger_attack.apply(x)

    def poison_local(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        target: int,
        *,
        rank: int = 0,
        num_attackers: int = 1,
        client_id: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Trigger ``round(poison_fraction * #non-target)`` local samples and relabel them ``target``."""
        eligible = torch.nonzero(y != target).flatten().numpy()
        count = round(self.poison_fraction * len(eligible))
        rows = np.random.default_rng([self.seed, client_id]).choice(eligible, size=count, replace=False)
        x, y = x.clone(), y.clone()
        if count:
            rows_t = torch.as_tensor(np.sort(rows))
            x[rows_t] = self.client_trigger(x[rows_t], rank, num_attackers)
            y[rows_t] = target
        return x, y

    def _poison(self, ctx: MaliciousContext) -> tuple[torch.Tensor, torch.Tensor]:
        return self.poison_local(
            ctx.x, ctx.y, ctx.target_label, rank=ctx.rank, num_attackers=ctx.num_attackers, client_id=ctx.client_id
        )

    def malicious_update(self, ctx: MaliciousContext) -> StateDict:
        """Train on poisoned local data, then :meth:`transform_update`."""
        x, y = self._poison(ctx)
        return self.transform_update(ctx.train(x, y, epochs=self.local_epochs), ctx)

    def transform_update(self, update: StateDict, ctx: MaliciousContext) -> StateDict:
        return update


@ATTACKS.register()
@dataclass(frozen=True)
class FLDataPoisoning(FederatedAttack):
    """Data poisoning by malicious clients: plain local training on triggered, relabelled samples.

    The baseline FL backdoor (Bagdasaryan et al., AISTATS 2020, https://arxiv.org/abs/1807.00459, "naive approach").

    Example:
        ```python
        attack = FLDataPoisoning(trigger="badnets", trigger_params={"patch_size": 4}, poison_fraction=0.5, seed=0)
        triggered = attack.apply(torch.zeros(2, 1, 28, 28))   # the probe trigger, (N, C, H, W) in [0, 1]
        ```
    """

    name: ClassVar[str] = "fl_data_poisoning"


@functools.lru_cache(maxsize=64)
def _dba_masks(attack: DBA, channels: int, height: int, width: int) -> torch.Tensor:
    # The trigger's footprint: pixels it changes on black, white and a seeded noise image (a white patch is
    # invisible on white, so one reference image is not enough).
    refs = torch.stack(
        [
            torch.zeros(channels, height, width),
            torch.ones(channels, height, width),
            torch.rand(channels, height, width, generator=torch.Generator().manual_seed(0)),
        ]
    )
    support = (attack.trigger_attack.apply(refs) != refs).any(dim=1).any(dim=0)
    if not support.any():
        raise ValueError(f"trigger {attack.trigger!r} changes no pixel of a {height}x{width} image; cannot split it")
    rows, cols = torch.nonzero(support, as_tuple=True)
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    k = attack.num_parts
    grid_r = max(d for d in range(1, int(math.isqrt(k)) + 1) if k % d == 0)
    grid_c = k // grid_r
    if r1 - r0 < grid_r or c1 - c0 < grid_c:
        raise ValueError(
            f"the trigger's {r1 - r0}x{c1 - c0} footprint cannot be split into {k} parts; lower num_parts"
        )
    row_cuts = np.linspace(r0, r1, grid_r + 1).round().astype(int)
    col_cuts = np.linspace(c0, c1, grid_c + 1).round().astype(int)
    masks = torch.zeros(k, height, width, dtype=torch.bool)
    for i in range(grid_r):
        for j in range(grid_c):
            masks[i * grid_c + j, row_cuts[i] : row_cuts[i + 1], col_cuts[j] : col_cuts[j + 1]] = True
    return masks


@ATTACKS.register()
@dataclass(frozen=True)
class DBA(FederatedAttack):
    """Distributed Backdoor Attack (Xie et al., ICLR 2020, https://openreview.net/forum?id=rkgyS0VFvr).

    The trigger's footprint (its bounding box) is cut into a ``rows × cols`` grid of ``num_parts`` tiles; malicious
    client number ``rank`` poisons its data with its own part(s) only (:meth:`parts_of`). The global model is tested with the
    whole trigger (:meth:`apply`), which no single client ever used.

    Args:
        num_parts: number of trigger parts (the paper uses 4); at least 2, since one part is plain data poisoning.

    Example:
        ```python
        dba = DBA(num_parts=4, seed=0)
        masks = dba.part_masks(1, 28, 28)            # (4, 28, 28) bool, disjoint, together the whole footprint
        local = dba.apply_part(torch.zeros(8, 1, 28, 28), part=2)
        ```
    """

    name: ClassVar[str] = "dba"

    trigger_params: Any = (("patch_size", 6), ("pattern", "checkerboard"))
    num_parts: int = 4

    def __post_init__(self) -> None:
        # One part would be the whole trigger: every client would train on it whole, which DBA is defined against.
        check_int("num_parts", self.num_parts, minimum=2)
        super().__post_init__()

    def part_masks(self, channels: int, height: int, width: int) -> torch.Tensor:
        """``(num_parts, H, W)`` bool masks: disjoint tiles that together cover the trigger's bounding box."""
        return _dba_masks(self, channels, height, width)

    def apply_part(self, inputs: torch.Tensor, part: int) -> torch.Tensor:
        """Apply part ``part`` of the trigger to ``(N, C, H, W)`` (or ``(C, H, W)``) float inputs in ``[0, 1]``."""
        if not 0 <= part < self.num_parts:
            raise ValueError(f"part must be in [0, {self.num_parts}), got {part}")
        mask = self.part_masks(*inputs.shape[-3:])[part].to(inputs.dtype)
        full = self.trigger_attack.apply(inputs)
        return inputs + mask * (full - inputs)

    def parts_of(self, rank: int, num_attackers: int) -> list[int]:
        """The trigger parts malicious client ``rank`` owns: ``[rank % num_parts]`` when there are at least as many
        attackers as parts (the paper's setting), else every ``num_attackers``-th part from ``rank`` on, so the
        attackers together still hold the whole trigger and none of them trains on it whole."""
        if num_attackers >= self.num_parts:
            return [rank % self.num_parts]
        return list(range(rank % num_attackers, self.num_parts, num_attackers))

    def client_trigger(self, x: torch.Tensor, rank: int = 0, num_attackers: int = 1) -> torch.Tensor:
        parts = self.parts_of(rank, num_attackers)
        if len(parts) == 1:
            return self.apply_part(x, parts[0])
        out = x.clone()
        for i, part in enumerate(parts):  # sample j gets part parts[j % len(parts)]
            out[i :: len(parts)] = self.apply_part(x[i :: len(parts)], part)
        return out


@ATTACKS.register()
@dataclass(frozen=True)
class ModelReplacement(FederatedAttack):
    """Model replacement (Bagdasaryan et al., AISTATS 2020, https://arxiv.org/abs/1807.00459).

    The attacker trains a backdoored model X and submits ``G + γ (X − G)`` with ``γ = n / η`` (``n`` clients in the
    round, ``η`` the server learning rate), so that averaging leaves the global model ≈ X. With ``m`` colluding
    attackers in a round each uses ``γ / m``. Exact when all clients report the same number of examples.

    Args:
        scale: a fixed γ instead of ``n / (η m)``.

    Example:
        ```python
        ModelReplacement().replacement_scale(num_selected=10, server_lr=1.0)   # 10.0
        ```
    """

    name: ClassVar[str] = "model_replacement"

    scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale is not None:
            check_float("scale", self.scale, 0.0)

    def replacement_scale(self, num_selected: int, server_lr: float, num_malicious: int = 1) -> float:
        """γ: the fixed ``scale`` or ``num_selected / (server_lr * num_malicious)``."""
        if self.scale is not None:
            return float(self.scale)
        return num_selected / (server_lr * max(1, num_malicious))

    def transform_update(self, update: StateDict, ctx: MaliciousContext) -> StateDict:
        gamma = self.replacement_scale(ctx.num_selected, ctx.server_lr, ctx.num_malicious)
        return {k: v * gamma for k, v in update.items()}


def project_l2(update: Mapping[str, torch.Tensor], bound: float) -> StateDict:
    """Scale ``update`` down onto the L2 ball of radius ``bound`` (unchanged if already inside)."""
    norm = update_norm(update)
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}


@ATTACKS.register()
@dataclass(frozen=True)
class ModelReplacementConstrained(ModelReplacement):
    """Norm-constrained model replacement ("constrain-and-scale", Bagdasaryan et al. 2020).

    The scaled update is projected onto the L2 ball of radius ``norm_bound`` so that a server clipping update norms
    at that bound sees nothing to clip. ``norm_bound=None`` uses the norm of the attacker's own *benign* update (local
    training on its clean data): the update then looks as large as an honest one.

    Args:
        norm_bound: radius of the L2 ball (``None``: the attacker's benign-update norm).

    Example:
        ```python
        attack = ModelReplacementConstrained(norm_bound=0.5)
        ```
    """

    name: ClassVar[str] = "model_replacement_constrained"

    norm_bound: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_bound is not None:
            check_float("norm_bound", self.norm_bound, 1e-12)

    def transform_update(self, update: StateDict, ctx: MaliciousContext) -> StateDict:
        bound = self.norm_bound if self.norm_bound is not None else update_norm(ctx.train(ctx.x, ctx.y))
        return project_l2(super().transform_update(update, ctx), bound)


@ATTACKS.register()
@dataclass(frozen=True)
class Neurotoxin(FederatedAttack):
    """Neurotoxin (Zhang et al., ICML 2022, https://arxiv.org/abs/2206.10341): durable backdoors.

    The attacker estimates where benign clients move the model (the previous round's aggregated update; in the
    first round its own update on clean data) and confines its update to the ``keep_ratio`` fraction of coordinates
    with the smallest ``|benign update|`` — coordinates that later benign rounds will not overwrite. The mask is
    applied to every local gradient step (projected SGD) and to the final update, so the update is exactly zero
    outside it. The ranking is global over all parameters.

    Args:
        keep_ratio: fraction of coordinates the attacker may change (the paper masks the top 1–10 %).
        scale: factor applied to the masked update (1 = the paper's plain attack).
        norm_bound: optional L2 projection of the final update (the paper evaluates under norm clipping).

    Example:
        ```python
        mask = Neurotoxin(keep_ratio=0.9).mask_from({"w": torch.tensor([0.1, -5.0, 0.2, 0.0])})
        # keeps round(0.9 * 4) = 4 -> all; with keep_ratio=0.5: {"w": tensor([1., 0., 0., 1.])}
        ```
    """

    name: ClassVar[str] = "neurotoxin"

    keep_ratio: float = 0.9
    scale: float = 1.0
    norm_bound: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("keep_ratio", self.keep_ratio, 0.0, 1.0)
        check_float("scale", self.scale, 0.0)
        if self.norm_bound is not None:
            check_float("norm_bound", self.norm_bound, 1e-12)

    def mask_from(self, reference: Mapping[str, torch.Tensor]) -> StateDict:
        """``name -> 0/1`` masks selecting the ``round(keep_ratio * total)`` smallest ``|reference|`` coordinates."""
        keys = list(reference)
        flat = torch.cat([reference[k].detach().abs().flatten().double() for k in keys])
        keep = round(self.keep_ratio * flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[torch.argsort(flat, stable=True)[:keep]] = True
        out, offset = {}, 0
        for k in keys:
            n = reference[k].numel()
            out[k] = chosen[offset : offset + n].view_as(reference[k]).to(reference[k].dtype)
            offset += n
        return out

    def malicious_update(self, ctx: MaliciousContext) -> StateDict:
        reference = ctx.reference_update if ctx.reference_update is not None else ctx.train(ctx.x, ctx.y)
        mask = self.mask_from(reference)
        x, y = self._poison(ctx)
        update = ctx.train(x, y, epochs=self.local_epochs, grad_mask=mask)
        update = {k: v * mask[k] * self.scale if k in mask else v * 0 for k, v in update.items()}
        return project_l2(update, self.norm_bound) if self.norm_bound is not None else update


@ATTACKS.register()
@dataclass(frozen=True)
class TargetedWeightModification(FederatedAttack):
    """Targeted weight modification: only the last layers are edited to plant the trigger response.

    The attacker freezes everything but the last ``num_modules`` modules that own parameters (for a CNN: the head
    and the layers just before it), fits those to its poisoned data, and scales the edit like model replacement so
    that it survives averaging. The update is exactly zero outside the edited modules.

    Args:
        num_modules: how many of the model's last parameter-owning modules are edited.
        scale: γ; ``None`` uses the model-replacement scale ``n / (η m)``.
        lr: the attacker's SGD step for the edit (``None``: the clients' ``lr``). Fitting only the last layers to a
            trigger on frozen features needs larger steps than the clients' normal training.

    Example:
        ```python
        attack = TargetedWeightModification(num_modules=2)
        attack.edited_parameters(model)   # e.g. ['bn2.weight', 'bn2.bias', 'classifier.weight', 'classifier.bias']
        ```
    """

    name: ClassVar[str] = "targeted_weight_modification"

    num_modules: int = 3
    scale: float | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_modules", self.num_modules, minimum=1)
        if self.scale is not None:
            check_float("scale", self.scale, 0.0)
        if self.lr is not None:
            check_float("lr", self.lr, 0.0)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.lr is None:  # keep the zoo ids planned before ``lr`` existed (the spec id hashes these params)
            out.pop("lr")
        return out

    def edited_modules(self, model: nn.Module) -> list[str]:
        owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        return owners[-self.num_modules :]

    def edited_parameters(self, model: nn.Module) -> list[str]:
        """Names of the parameters this attack changes in ``model``."""
        prefixes = tuple(f"{m}." for m in self.edited_modules(model))
        return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]

    def malicious_update(self, ctx: MaliciousContext) -> StateDict:
        names = self.edited_parameters(ctx.model)
        prefixes = tuple(f"{m}." for m in self.edited_modules(ctx.model))
        x, y = self._poison(ctx)
        update = ctx.train(x, y, epochs=self.local_epochs, trainable=names, lr=self.lr)
        gamma = (
            self.scale if self.scale is not None else ctx.num_selected / (ctx.server_lr * max(1, ctx.num_malicious))
        )
        # Buffers of frozen layers (e.g. BatchNorm statistics) still move in train mode: zero them explicitly.
        return {k: v * gamma if k.startswith(prefixes) else torch.zeros_like(v) for k, v in update.items()}
