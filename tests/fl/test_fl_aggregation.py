"""Our FedAvg (the zoo's in-process aggregation) equals Flower's FedAvg.aggregate_train on the same replies."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional 'fl' extra: pip install -e '.[fl]'")

from flwr.serverapp.strategy import FedAvg  # noqa: E402

from metashield_hf.fl.federation import fedavg_aggregate  # noqa: E402
from metashield_hf.fl.flower import build_replies, flower_aggregate  # noqa: E402
from metashield_hf.fl.simulate import SmallCNN  # noqa: E402


def test_fedavg_aggregate_equals_flower_fedavg():
    torch.manual_seed(0)
    models = [SmallCNN().state_dict() for _ in range(4)]
    counts = [120, 7, 64, 301]
    ours = fedavg_aggregate(models, counts)
    arrays, metrics = FedAvg().aggregate_train(3, build_replies(models, counts, [11, 12, 13, 14], server_round=3))
    theirs = arrays.to_torch_state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype
        # Flower accumulates in float32, ours in float64: equal to float32 rounding.
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-6, atol=1e-7)
    by_hand = sum(n * m["classifier.bias"].double() for n, m in zip(counts, models, strict=True)) / sum(counts)
    torch.testing.assert_close(ours["classifier.bias"], by_hand.float())


def test_flower_aggregate_on_deltas_matches_fedavg_and_reports_krum_selection():
    from flwr.serverapp.strategy import Krum, MultiKrum

    torch.manual_seed(0)
    g = SmallCNN().state_dict()
    deltas = [{k: torch.randn_like(v) * 0.01 for k, v in g.items()} for _ in range(5)]
    deltas[2] = {k: v * 100 for k, v in deltas[2].items()}  # a far-away client
    new, selected, _ = flower_aggregate(FedAvg(), g, deltas, [1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    expected = fedavg_aggregate(deltas, [1, 2, 3, 4, 5])
    assert selected is None
    for k in g:
        torch.testing.assert_close(new[k], g[k] + expected[k], rtol=1e-5, atol=1e-6)
    _, krum, _ = flower_aggregate(Krum(num_malicious_nodes=1), g, deltas, [1] * 5, [10, 20, 30, 40, 50])
    _, multi, _ = flower_aggregate(
        MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3), g, deltas, [1] * 5, [10, 20, 30, 40, 50]
    )
    assert len(krum) == 1 and 30 not in krum
    assert len(multi) == 3 and 30 not in multi
