"""Known answers for the fl attacks: their triggers, their malicious updates, and their effect in a federated run."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from fed_builders import fed_attack as _attack
from fed_builders import fed_clients as _clients
from fed_builders import fed_config as _config
from fed_builders import fed_data as _data
from fed_builders import fed_model as _model
from metashield_hf.attacks import (
    ATTACKS,
    DBA,
    BadNets,
    FLDataPoisoning,
    ModelReplacement,
    ModelReplacementConstrained,
    Neurotoxin,
    TargetedWeightModification,
    attack_from_dict,
)
from metashield_hf.attacks.federated import MaliciousContext, StateDict, update_norm
from metashield_hf.fl.federation import fedavg_aggregate, local_train, run_federated

FL = [n for n in ATTACKS.list() if ATTACKS.get(n).domain == "fl"]
# A white top-left patch on black images: the pixels a trigger changes are exactly where it was put.
WHITE_TOP_LEFT = {"patch_size": 3, "pattern": "white", "location": "top_left"}


# ------------------------------------------------------------------------------------------------------- helpers
def _ctx(
    *,
    train: Callable[..., StateDict] | None = None,
    reference: StateDict | None = None,
    num_selected: int = 4,
    num_malicious: int = 1,
    server_lr: float = 1.0,
) -> MaliciousContext:
    """A fresh context: its own model (local training overwrites the model's weights) and generator, so two contexts
    built alike train identically."""
    model = _model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = _data(24, seed=99)
    gen = torch.Generator().manual_seed(0)

    def real_train(xx, yy, *, epochs=None, grad_mask=None, trainable=None, lr=None):
        return local_train(
            model, state, xx, yy, lr=lr or 0.1, epochs=epochs or 1, batch_size=8, generator=gen, grad_mask=grad_mask,
            trainable=trainable,
        )  # fmt: skip

    return MaliciousContext(
        client_id=3, rank=0, num_attackers=1, round=1, x=x, y=y, target_label=0, num_selected=num_selected,
        num_malicious=num_malicious, server_lr=server_lr, model=model, global_state=state,
        reference_update=reference, train=train or real_train, generator=gen,
    )  # fmt: skip


def _fixed_train(update: StateDict) -> Callable[..., StateDict]:
    return lambda x, y, **kwargs: {k: v.clone() for k, v in update.items()}


def _assert_states_equal(a: StateDict, b: StateDict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------- every fl attack
@pytest.mark.parametrize("name", FL)
def test_apply_puts_the_trigger_where_configured(name):
    attack = ATTACKS.build(name, trigger="badnets", trigger_params=WHITE_TOP_LEFT, seed=1)
    out = attack.apply(torch.zeros(2, 3, 10, 10))
    expected = torch.zeros(2, 3, 10, 10)
    expected[..., :3, :3] = 1
    assert torch.equal(out, expected)
    moved = ATTACKS.build(name, trigger="badnets", trigger_params={**WHITE_TOP_LEFT, "location": [4, 5]})
    expected = torch.zeros(1, 10, 10)
    expected[:, 4:7, 5:8] = 1
    assert torch.equal(moved.apply(torch.zeros(1, 10, 10)), expected)
    assert attack_from_dict(moved.to_dict()) == moved
    # A seeded trigger gets the attack's seed unless its parameters name their own.
    rnd = {"patch_size": 4, "pattern": "random"}
    x = torch.zeros(1, 1, 8, 8)
    a, b = (ATTACKS.build(name, trigger_params=rnd, seed=s) for s in (1, 2))
    assert torch.equal(a.apply(x), BadNets(**rnd, seed=1).apply(x)) and not torch.equal(a.apply(x), b.apply(x))
    own = ATTACKS.build(name, trigger_params={**rnd, "seed": 5}, seed=1)
    assert torch.equal(own.apply(x), BadNets(**rnd, seed=5).apply(x)) and not own.seed_dependent
    with pytest.raises(ValueError, match="trigger='rare_word' must be a cv attack"):
        ATTACKS.build(name, trigger="rare_word")


@pytest.mark.parametrize("name", FL)
def test_poison_local_triggers_and_relabels_seeded_rows(name):
    attack = ATTACKS.build(name, trigger="badnets", trigger_params=WHITE_TOP_LEFT, poison_fraction=0.4, seed=2)
    x, y = torch.rand(20, 1, 10, 10, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 4
    px, py = attack.poison_local(x, y, target=0, client_id=5)
    rows = torch.nonzero(py != y).flatten()
    assert len(rows) == round(0.4 * 15) == 6 and (py[rows] == 0).all() and (y[rows] != 0).all()
    assert torch.equal(px[rows], attack.client_trigger(x[rows]))
    kept = torch.ones(20, dtype=torch.bool)
    kept[rows] = False
    assert torch.equal(px[kept], x[kept]) and torch.equal(py[kept], y[kept])
    again = ATTACKS.build(name, trigger="badnets", trigger_params=WHITE_TOP_LEFT, poison_fraction=0.4, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(again.poison_local(x, y, 0, client_id=5), (px, py), strict=True))
    reseeded = ATTACKS.build(name, trigger="badnets", trigger_params=WHITE_TOP_LEFT, poison_fraction=0.4, seed=3)
    assert not torch.equal(reseeded.poison_local(x, y, 0, client_id=5)[1], py)


@pytest.mark.parametrize("name", FL)
def test_malicious_update_is_deterministic_under_seed(name):
    model = _model()
    reference = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
                 for k, v in model.state_dict().items() if v.is_floating_point()}  # fmt: skip
    a = _attack(name).malicious_update(_ctx(reference=reference))
    b = _attack(name).malicious_update(_ctx(reference=reference))
    _assert_states_equal(a, b)
    assert update_norm(a) > 0


# ------------------------------------------------------------------------------------------------------- DBA
def _changed(attack: DBA, x: torch.Tensor, rank: int, num_attackers: int) -> torch.Tensor:
    """``(N, H, W)`` bool: the pixels client ``rank``'s trigger changes on each of the black images ``x``."""
    return (attack.client_trigger(x, rank, num_attackers) != x).any(dim=1)


def test_dba_parts_tile_the_trigger():
    dba = DBA(trigger="badnets", trigger_params={**WHITE_TOP_LEFT, "patch_size": 4}, num_parts=4)
    masks = dba.part_masks(1, 10, 10)
    expected = torch.zeros(4, 10, 10, dtype=torch.bool)
    for k, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):  # a 2x2 grid of 2x2 tiles, row-major
        expected[k, r : r + 2, c : c + 2] = True
    assert torch.equal(masks, expected)
    assert DBA(trigger_params={"patch_size": 6}, num_parts=6).part_masks(1, 8, 8).sum(dim=(1, 2)).tolist() == [6] * 6
    with pytest.raises(ValueError, match="num_parts must be >= 2, got 1"):  # one part would be the whole trigger
        DBA(num_parts=1)
    with pytest.raises(ValueError, match="footprint cannot be split into 9 parts"):
        DBA(trigger_params={"patch_size": 2}, num_parts=9).part_masks(1, 8, 8)


@pytest.mark.parametrize("num_attackers", [1, 2, 4, 6])
def test_dba_clients_hold_strict_parts_whose_union_is_the_trigger(num_attackers):
    dba = DBA(trigger="badnets", trigger_params={**WHITE_TOP_LEFT, "patch_size": 4}, num_parts=4)
    x = torch.zeros(8, 1, 10, 10)
    full = (dba.apply(x[:1]) != x[:1]).any(dim=1)[0]
    assert full.sum() == 16 and full[:4, :4].all()
    union = torch.zeros_like(full)
    for rank in range(num_attackers):
        changed = _changed(dba, x, rank, num_attackers)
        for image in changed:  # no poisoned sample ever carries the whole trigger
            assert image.any() and (image <= full).all() and image.sum() < full.sum()
        client = changed.any(dim=0)
        if num_attackers > 1:  # with several attackers, none of them even holds the whole trigger
            assert client.sum() < full.sum()
        union |= client
    assert torch.equal(union, full)


# ---------------------------------------------------------------------------------------- model replacement
def test_model_replacement_scales_by_n_over_eta():
    delta = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    out = ModelReplacement().malicious_update(_ctx(train=_fixed_train(delta), num_selected=10, server_lr=0.5))
    assert torch.equal(out["w"], torch.tensor([20.0, -40.0])) and torch.equal(out["b"], torch.tensor([10.0]))
    two = ModelReplacement().malicious_update(_ctx(train=_fixed_train(delta), num_selected=10, num_malicious=2))
    assert torch.equal(two["w"], torch.tensor([5.0, -10.0]))  # two colluders share γ: 10 / (1 * 2)
    fixed = ModelReplacement(scale=3.0).malicious_update(_ctx(train=_fixed_train(delta), num_selected=10))
    assert torch.equal(fixed["w"], torch.tensor([3.0, -6.0]))
    assert ModelReplacement().replacement_scale(num_selected=10, server_lr=1.0) == 10.0


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_model_replacement_replaces_the_global_model(server_lr):
    # 4 equal clients, benign ones that do not move: after aggregation the global model is exactly the attacker's X.
    g = {"w": torch.tensor([1.0, 1.0, 1.0])}
    x_model = {"w": torch.tensor([3.0, -1.0, 0.5])}
    delta = {"w": x_model["w"] - g["w"]}
    ctx = _ctx(train=_fixed_train(delta), num_selected=4, server_lr=server_lr)
    malicious = ModelReplacement().malicious_update(ctx)
    aggregated = fedavg_aggregate([malicious] + [{"w": torch.zeros(3)}] * 3, [10] * 4)
    torch.testing.assert_close(g["w"] + server_lr * aggregated["w"], x_model["w"])


def test_model_replacement_constrained_stays_in_the_ball():
    big = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}  # norm 5, scaled by γ = 4: norm 20
    out = ModelReplacementConstrained(norm_bound=2.0).malicious_update(_ctx(train=_fixed_train(big)))
    assert update_norm(out) == pytest.approx(2.0) and update_norm(out) <= 2.0 + 1e-6
    torch.testing.assert_close(out["w"], torch.tensor([1.2, 1.6]))  # the same direction
    inside = ModelReplacementConstrained(norm_bound=100.0).malicious_update(_ctx(train=_fixed_train(big)))
    assert torch.equal(inside["w"], torch.tensor([12.0, 16.0]))  # already inside: only scaled

    # norm_bound=None: the bound is the norm of the attacker's benign update (training on its clean data).
    ctx = _ctx()
    benign = {"w": torch.tensor([0.3, 0.4]), "b": torch.tensor([0.0])}

    def train(x, y, **kwargs):
        return {k: v.clone() for k, v in (benign if torch.equal(y, ctx.y) else big).items()}

    ctx.train = train
    out = ModelReplacementConstrained().malicious_update(ctx)
    assert update_norm(out) == pytest.approx(0.5) and update_norm(out) <= 0.5 + 1e-6


def test_model_replacement_constrained_in_a_run():
    attack = ModelReplacementConstrained(trigger_params={"patch_size": 2}, norm_bound=0.05)
    result = run_federated(_model(), _clients(), _config(), attack=attack)
    norms = [h["update_norms"][c] for h in result.history for c in h["malicious"]]
    assert len(norms) == 4 and all(n <= 0.05 * (1 + 1e-5) for n in norms)


# ------------------------------------------------------------------------------------------------ Neurotoxin
def test_neurotoxin_mask_keeps_the_smallest_coordinates():
    m = Neurotoxin(keep_ratio=0.5).mask_from({"w": torch.tensor([0.1, -5.0, 0.2, 0.0])})
    assert torch.equal(m["w"], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # The ranking is global: the two smallest |values| of all tensors together.
    m = Neurotoxin(keep_ratio=0.5).mask_from({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[1.0], [2.0]])})
    assert torch.equal(m["a"], torch.tensor([0.0, 1.0])) and torch.equal(m["b"], torch.tensor([[1.0], [0.0]]))
    assert Neurotoxin(keep_ratio=1.0).mask_from({"w": torch.ones(3)})["w"].sum() == 3


@pytest.mark.parametrize("use_reference", [True, False])
def test_neurotoxin_update_is_zero_outside_the_allowed_coordinates(use_reference):
    model = _model()
    attack = Neurotoxin(trigger_params={"patch_size": 2}, keep_ratio=0.7)
    if use_reference:  # the previous round's aggregated update
        reference = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
                     for k, v in model.state_dict().items() if v.is_floating_point()}  # fmt: skip
    else:  # first round: the attacker's own update on its clean data, with the same generator
        probe = _ctx()
        reference = probe.train(probe.x, probe.y)
    mask = attack.mask_from(reference)
    ref = torch.cat([reference[k].abs().flatten() for k in reference])
    kept = torch.cat([mask[k].flatten() for k in reference]).bool()
    assert kept.sum() == round(0.7 * ref.numel()) and ref[kept].max() <= ref[~kept].min()  # benign moves least

    update = attack.malicious_update(_ctx(reference=reference if use_reference else None))
    assert update.keys() == reference.keys()
    for k, v in update.items():
        assert (v[mask[k] == 0] == 0).all(), k
    assert sum(int((v != 0).sum()) for v in update.values()) > 0.5 * kept.sum()

    bounded = Neurotoxin(trigger_params={"patch_size": 2}, keep_ratio=0.7, scale=5.0, norm_bound=0.01)
    out = bounded.malicious_update(_ctx(reference=reference if use_reference else None))
    assert update_norm(out) <= 0.01 * (1 + 1e-5)
    assert all((v[mask[k] == 0] == 0).all() for k, v in out.items())


# ------------------------------------------------------------------------------------ targeted weight modification
def test_targeted_weight_modification_edits_only_the_last_layers():
    model = _model()
    assert TargetedWeightModification(num_modules=1).edited_parameters(model) == ["6.weight", "6.bias"]
    attack = TargetedWeightModification(trigger_params={"patch_size": 2}, num_modules=2, scale=2.0)
    assert attack.edited_parameters(model) == ["4.weight", "4.bias", "6.weight", "6.bias"]
    update = attack.malicious_update(_ctx())
    edited = {"4.weight", "4.bias", "6.weight", "6.bias"}
    for k, v in update.items():
        if k in edited:
            assert (v != 0).any(), k
        else:  # earlier parameters and the BatchNorm buffers (which move in train mode) are untouched
            assert (v == 0).all(), k
    assert {"1.running_mean", "1.running_var"} <= set(update)
    once = TargetedWeightModification(trigger_params={"patch_size": 2}, num_modules=2, scale=1.0)
    plain = once.malicious_update(_ctx())
    for k in edited:
        torch.testing.assert_close(update[k], 2.0 * plain[k])
    default = TargetedWeightModification(trigger_params={"patch_size": 2}, num_modules=2)  # γ = n / (η m) = 8
    scaled = default.malicious_update(_ctx(num_selected=4, server_lr=0.5))
    torch.testing.assert_close(scaled["6.weight"], 8.0 * plain["6.weight"])


def test_targeted_weight_modification_own_learning_rate():
    kw = {"trigger_params": {"patch_size": 2}, "num_modules": 2, "scale": 1.0}
    plain = TargetedWeightModification(**kw).malicious_update(_ctx())  # the clients' lr (0.1 in _ctx)
    same = TargetedWeightModification(**kw, lr=0.1).malicious_update(_ctx())
    faster = TargetedWeightModification(**kw, lr=0.3).malicious_update(_ctx())
    torch.testing.assert_close(same["6.weight"], plain["6.weight"])
    assert faster["6.weight"].norm() > 1.5 * plain["6.weight"].norm()
    assert (faster["0.weight"] == 0).all()
    # lr=None is left out of the params so that zoo ids planned before the field existed do not change
    assert "lr" not in TargetedWeightModification().to_dict()
    d = TargetedWeightModification(lr=0.3).to_dict()
    assert d["lr"] == 0.3 and attack_from_dict(d) == TargetedWeightModification(lr=0.3)


def test_fl_attack_defaults_are_valid():
    assert isinstance(FLDataPoisoning(), FLDataPoisoning) and DBA().num_parts == 4
    with pytest.raises(ValueError, match="keep_ratio must be a finite number in"):
        Neurotoxin(keep_ratio=1.5)
    with pytest.raises(ValueError, match="num_modules must be >= 1"):
        TargetedWeightModification(num_modules=0)
    with pytest.raises(ValueError, match="poison_fraction must be a finite number in"):
        FLDataPoisoning(poison_fraction=2.0)
    assert math.isclose(ModelReplacement().replacement_scale(5, 0.5, num_malicious=2), 5.0)
