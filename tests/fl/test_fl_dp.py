"""Flower's server-side DP clipping wrappers driven through ``flower_aggregate`` / ``flower_defence``: known answers
with the noise off (clipped FedAvg by hand; the adaptive clipping norm's update rule over rounds)."""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional 'fl' extra: pip install -e '.[fl]'")

from flwr.serverapp.strategy import (  # noqa: E402
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from metashield_hf.fl.federation import fedavg_aggregate  # noqa: E402
from metashield_hf.fl.flower import flower_aggregate, flower_defence  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(delta) -> float:
    """L2 norm over every entry of the update (Flower flattens all arrays of a reply into one vector)."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))


def _updates(g, norms, seed):
    """Random updates with exactly these L2 norms."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in norms:
        d = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in g.items()}
        scale = n / _norm(d)
        out.append({k: (t * scale).float() for k, t in d.items()})
    return out


def _clipped_fedavg(deltas, counts, clipping_norm):
    """By hand: each update scaled by min(1, C / ||Δ||), then the num-examples-weighted mean."""
    factors = [min(1.0, clipping_norm / _norm(d)) for d in deltas]
    return {
        k: sum(n * s * d[k].double() for d, n, s in zip(deltas, counts, factors, strict=True)) / sum(counts)
        for k in deltas[0]
    }


def test_fixed_clipping_round_is_fedavg_of_clipped_updates():
    torch.manual_seed(0)
    g = SmallCNN().state_dict()
    deltas = _updates(g, [0.5, 1.5, 4.0, 20.0], seed=1)  # two under the norm, two over it
    counts, ids = [10, 30, 20, 40], [7, 8, 9, 10]
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=2.0, num_sampled_clients=4
    )
    rng_before = random.getstate()
    new, selected, _ = flower_aggregate(strategy, g, deltas, counts, ids, server_round=1)
    assert random.getstate() == rng_before  # configure_train's node sampling does not move Python's RNG
    assert TaskIdentity._run_id is None  # the placeholder task identity is put back
    assert selected is None  # an aggregator, not a selection rule
    expected = _clipped_fedavg(deltas, counts, 2.0)
    plain = fedavg_aggregate(deltas, counts)
    for k in g:
        torch.testing.assert_close(new[k], (g[k].double() + expected[k]).float(), rtol=1e-5, atol=1e-6)
    # the clipping matters here: the plain FedAvg of the same updates is far from it
    assert max(float((plain[k].double() - expected[k]).abs().max()) for k in g) > 1e-2


def test_adaptive_clipping_norm_follows_flowers_rule_across_rounds():
    torch.manual_seed(0)
    model = SmallCNN()
    c0, lr, target = 1.0, 0.2, 0.5
    strategy = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=0.0, num_sampled_clients=5, initial_clipping_norm=c0,
        target_clipped_quantile=target, clip_norm_lr=lr,
    )  # fmt: skip
    defence = flower_defence(strategy)  # one instance for every round, as in a Flower run
    counts, ids = [10, 20, 30, 40, 50], [1, 2, 3, 4, 5]
    rounds = [
        [0.1, 0.2, 3.0, 4.0, 5.0],  # 3 of 5 clipped
        [5.0, 6.0, 7.0, 8.0, 9.0],  # all clipped
        [0.1, 0.2, 0.3, 0.4, 0.5],  # none clipped
    ]
    c, norms_seen = c0, []
    for r, norms in enumerate(rounds, start=1):
        g = {k: v.clone() for k, v in model.state_dict().items()}
        deltas = _updates(g, norms, seed=r)
        update, kept, info = defence(model, deltas, counts, ids)
        assert kept is None and "declined" not in info
        # this round's replies are clipped with the norm it started with ...
        expected = _clipped_fedavg(deltas, counts, c)
        for k in g:
            torch.testing.assert_close(update[k].double(), expected[k], rtol=1e-4, atol=2e-6)
        # ... and then Flower moves the norm by exp(-lr * (clipped fraction - target)) (noise off: the exact count)
        clipped = sum(n > c for n in norms)
        c *= math.exp(-lr * (clipped / len(norms) - target))
        assert strategy.clipping_norm == pytest.approx(c, rel=1e-12)
        norms_seen.append(strategy.clipping_norm)
        model.load_state_dict({k: v + update[k] if k in update else v for k, v in g.items()})
    # Flower counts *clipped* updates, so the norm shrinks when more than the target share is clipped and grows
    # when none is (Andrew et al. count the unclipped ones, which moves it the other way)
    assert norms_seen[0] < c0 and norms_seen[1] < norms_seen[0] and norms_seen[2] > norms_seen[1]


def test_too_few_clients_for_the_strategy_is_a_clear_error():
    g = SmallCNN().state_dict()
    with pytest.raises(ValueError, match="waits for at least 2 nodes but the round has 1 clients"):
        flower_aggregate(FedAvg(), g, _updates(g, [1.0], seed=0), [10])
