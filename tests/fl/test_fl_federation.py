"""Known answers for the federated simulator: FedAvg, local training, FedProx, the run's settings and its seeding."""

from __future__ import annotations

import pytest
import torch

from fed_builders import fed_attack as _attack
from fed_builders import fed_clients as _clients
from fed_builders import fed_config as _config
from fed_builders import fed_data as _data
from fed_builders import fed_model as _model
from metashield_hf.attacks import ATTACKS
from metashield_hf.attacks.federated import StateDict, update_norm
from metashield_hf.fl.federation import FedConfig, fedavg_aggregate, local_train, run_federated

FL = [n for n in ATTACKS.list() if ATTACKS.get(n).domain == "fl"]


# ------------------------------------------------------------------------------------------------------- helpers
def _assert_states_equal(a: StateDict, b: StateDict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------------- FedAvg
def test_fedavg_aggregate_is_the_example_weighted_mean():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([4.0]), "steps": torch.tensor(6)}
    out = fedavg_aggregate([a, b], [1, 3])  # weights 1/4 and 3/4, by hand
    assert torch.equal(out["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out["b"], torch.tensor([3.0]))
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 5  # (3 + 18) / 4 = 5.25, rounded back
    assert out["w"].dtype == torch.float32
    assert torch.equal(fedavg_aggregate([a, b], [2, 2])["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(fedavg_aggregate([a, b], [0, 5])["b"], b["b"])  # a client with no examples has no say
    with pytest.raises(ValueError, match="need one num_examples per client, got 2 arrays and 1 counts"):
        fedavg_aggregate([a, b], [1])
    with pytest.raises(ValueError, match="num_examples must be >= 0 with a positive sum"):
        fedavg_aggregate([a, b], [0, 0])


# ---------------------------------------------------------------------------------------------- local training
def test_local_train_masks_and_freezes_exactly():
    model, (x, y) = _model(), _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mask = {n: (torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5).float()
            for n, p in model.named_parameters()}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    update = local_train(model, state, x, y, lr=0.1, epochs=2, batch_size=8, generator=gen, grad_mask=mask)
    assert "1.num_batches_tracked" not in update  # integer buffers are not part of an update
    for n, m in mask.items():
        assert (update[n][m == 0] == 0).all(), n
    assert (update["0.weight"][mask["0.weight"] == 1] != 0).all()  # (the conv bias is cancelled by the BatchNorm)
    frozen = local_train(model, state, x, y, lr=0.1, epochs=1, batch_size=8, generator=gen, trainable=["6.weight"])
    params = {n for n, _ in model.named_parameters()}
    assert all((frozen[n] == 0).all() for n in params - {"6.weight"}) and (frozen["6.weight"] != 0).any()
    assert all(torch.equal(v, state[k]) for k, v in _model().state_dict().items())  # the start was not mutated
    with pytest.raises(ValueError, match=r"trainable parameters \['nope'\] are not in the model"):
        local_train(model, state, x, y, lr=0.1, epochs=1, batch_size=8, generator=gen, trainable=["nope"])


def test_fedprox_proximal_term_shrinks_the_update():
    model, (x, y) = _model(), _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def norm(mu: float) -> float:
        gen = torch.Generator().manual_seed(0)
        return update_norm(local_train(model, state, x, y, lr=0.1, epochs=3, batch_size=8, generator=gen, mu=mu))

    assert norm(2.0) < norm(0.0)


def test_fed_config_validation():
    assert FedConfig(rounds=6).resolved_attack_rounds == (4, 5, 6)  # default: the last half
    assert FedConfig(rounds=6, attack_rounds=[5, 2, 5]).resolved_attack_rounds == (2, 5)
    with pytest.raises(ValueError, match=r"attack_rounds \[7\] outside 1..rounds=6"):
        FedConfig(rounds=6, attack_rounds=(7,))
    with pytest.raises(ValueError, match="clients_per_round=5 > num_clients=3"):
        FedConfig(num_clients=3, clients_per_round=5)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        FedConfig(algorithm="fedsgd")


@pytest.mark.parametrize("name", FL)
def test_run_federated_matches_the_clean_run_until_the_first_attack_round(name):
    clients, config = _clients(), _config()
    init = _model().state_dict()

    def run(attack):
        model = _model()
        model.load_state_dict(init)
        return run_federated(model, clients, config, attack=attack, snapshot_rounds=(1, 2, 3))

    clean, attacked, again = run(None), run(_attack(name)), run(_attack(name))
    assert attacked.attack_rounds == (3, 4) and clean.attack_rounds == ()
    assert len(attacked.malicious_clients) == 2 and clean.malicious_clients == ()
    for rnd in (1, 2):  # before the first attack round: the very same global model
        _assert_states_equal(attacked.snapshots[rnd], clean.snapshots[rnd])
    assert any(not torch.equal(attacked.snapshots[3][k], clean.snapshots[3][k]) for k in clean.snapshots[3])
    for h in attacked.history:
        if h["round"] in (3, 4):
            assert h["malicious"] == list(attacked.malicious_clients) == h["clients"][:2]
        else:
            assert h["malicious"] == []
    _assert_states_equal(attacked.state, again.state)  # deterministic under the seeds
    other = run(_attack(name, seed=1))
    assert any(not torch.equal(other.state[k], attacked.state[k]) for k in other.state)


def test_run_federated_checks_the_clients():
    with pytest.raises(ValueError, match="config.num_clients=8 but 3 clients were given"):
        run_federated(_model(), _clients(3), _config())
