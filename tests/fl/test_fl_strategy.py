"""MetaShieldStrategy.aggregate_train on built Flower Messages: the poisoned reply is dropped (or down-weighted),
the round's MetricRecord holds every client's score, and the wrapped strategy sees only what is kept."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional 'fl' extra: pip install -e '.[fl]'")

from fl_helpers import MALICIOUS, screened_round  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from metashield_hf.fl import ClientScore, MetaShieldStrategy  # noqa: E402
from metashield_hf.fl.federation import fedavg_aggregate  # noqa: E402
from metashield_hf.fl.flower import build_replies  # noqa: E402
from metashield_hf.fl.screen import candidate_state  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN  # noqa: E402

NODES = [101, 102, 103, 104, 105]


class SpyFedAvg(FedAvg):
    """FedAvg that remembers the replies it was asked to aggregate."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen.append(replies)
        return super().aggregate_train(server_round, replies)


pytestmark = pytest.mark.usefixtures("one_thread")


def _replies(model, deltas, counts):
    g = model.state_dict()
    return build_replies([candidate_state(g, d) for d in deltas], counts, NODES, server_round=4)


def test_metashield_strategy_drops_the_poisoned_reply():
    model, deltas, counts, clean, _ = screened_round()
    spy = SpyFedAvg()
    strategy = MetaShieldStrategy(spy, clean[:10], SmallCNN, seed=0)
    strategy.set_global_arrays(ArrayRecord(model.state_dict()))
    arrays, metrics = strategy.aggregate_train(4, _replies(model, deltas, counts))
    kept = [m.metadata.src_node_id for m in spy.seen[-1]]
    assert kept == [n for i, n in enumerate(NODES) if i != MALICIOUS]
    assert metrics[f"metashield-flagged-{NODES[MALICIOUS]}"] == 1 and metrics["metashield-num-flagged"] == 1
    assert all(f"metashield-score-{n}" in metrics for n in NODES)
    assert metrics[f"metashield-score-{NODES[MALICIOUS]}"] == max(metrics[f"metashield-score-{n}"] for n in NODES)
    assert [s.client for s in strategy.history[4]] == NODES
    # what was aggregated is FedAvg over the four benign clients
    benign = [i for i in range(5) if i != MALICIOUS]
    expected = fedavg_aggregate([deltas[i] for i in benign], [counts[i] for i in benign])
    got = arrays.to_torch_state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], model.state_dict()[k] + v, rtol=1e-5, atol=1e-6)


def _fake_screen(flag_nodes):
    def screen(model, updates, clean, detector, *, client_ids, as_deltas, **_):
        assert as_deltas is False and len(updates) == len(client_ids)
        return [ClientScore(c, i, float(c in flag_nodes), c in flag_nodes) for i, c in enumerate(client_ids)]

    return screen


def test_downweight_scales_num_examples_and_errors_are_clear():
    torch.manual_seed(0)
    g = SmallCNN().state_dict()
    deltas = [{k: torch.randn_like(v) * 0.01 for k, v in g.items() if v.is_floating_point()} for _ in range(3)]
    spy = SpyFedAvg()
    strategy = MetaShieldStrategy(
        spy, None, SmallCNN, action="downweight", downweight=0.25, screen=_fake_screen({102})
    )
    with pytest.raises(RuntimeError, match="set_global_arrays"):
        strategy.aggregate_train(1, build_replies([g] * 3, [8, 8, 8], NODES[:3]))
    strategy.set_global_arrays(ArrayRecord(g))
    replies = build_replies([candidate_state(g, d) for d in deltas], [8, 8, 8], NODES[:3])
    arrays, metrics = strategy.aggregate_train(1, replies)
    weights = [m.content["metrics"]["num-examples"] for m in spy.seen[-1]]
    assert weights == [8, 2.0, 8] and replies[1].content["metrics"]["num-examples"] == 8  # the input is not mutated
    expected = fedavg_aggregate(deltas, [8, 2, 8])
    torch.testing.assert_close(
        arrays.to_torch_state_dict()["classifier.bias"], g["classifier.bias"] + expected["classifier.bias"]
    )
    assert metrics["metashield-flagged-102"] == 1 and metrics["metashield-num-flagged"] == 1
    with pytest.raises(ValueError, match="action must be"):
        MetaShieldStrategy(FedAvg(), None, SmallCNN, action="ignore")


def test_every_reply_flagged_aggregates_nothing():
    g = SmallCNN().state_dict()
    spy = SpyFedAvg()
    strategy = MetaShieldStrategy(spy, None, SmallCNN, screen=_fake_screen(set(NODES)))
    strategy.set_global_arrays(ArrayRecord(g))
    arrays, metrics = strategy.aggregate_train(2, build_replies([g] * 3, [8, 8, 8], NODES[:3]))
    assert arrays is None and spy.seen == [] and metrics["metashield-num-flagged"] == 3
