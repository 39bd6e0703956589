"""The learned-query probe (MNTD): permutation-invariant answers, the query space, and query tuning that tells
models with a planted trigger from clean ones it was not trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from metashield_hf.scan import QueryProbe, QueryProbeConfig, query_features, query_space, train_query_probe
from metashield_hf.targets import load_target

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 0


class Planted(nn.Module):
    """A seeded linear digits-sized classifier (1 x 8 x 8 inputs, 10 classes) whose head also reads a 65th feature,
    a smooth detector of a bright 3 x 3 top-left corner; with a ``target``, the head weighs that feature 30 for the
    target class (a planted patch trigger: a feature clean inputs leave quiet, read by one class)."""

    def __init__(self, seed: int, target: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(65, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn((10, 65), generator=gen) * 0.3)
            self.head.weight[:, 64] = 0.0
            if target is not None:
                self.head.weight[target, 64] = 30.0
            self.head.bias.copy_(torch.randn(10, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = torch.sigmoid(20.0 * (x[:, :, :3, :3].mean((1, 2, 3)) - 0.65))
        return self.head(torch.cat([x.flatten(1), corner[:, None]], 1))


def _space(model: nn.Module):
    items = list(torch.rand((20, 1, 8, 8), generator=torch.Generator().manual_seed(5)))
    adapter = load_target(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return query_space(adapter, items)


def test_query_features_do_not_depend_on_class_order():
    logits = torch.randn((6, 10), generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    feats = query_features(logits)
    assert feats.shape == (2 * 6 + 4,)
    assert torch.allclose(feats, query_features(logits[:, perm]), atol=1e-6)
    # known answer: every query certain of class 3 -> attractor log-probabilities 0, top mass 1, entropy 0
    sure = torch.full((4, 5), -1e4)
    sure[:, 3] = 0.0
    f = query_features(sure)
    assert torch.allclose(f[:8], torch.zeros(8), atol=1e-6)
    assert f[8:11].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6) and float(f[-1]) == pytest.approx(
        0.0, abs=1e-5
    )
    with pytest.raises(ValueError, match="K >= 2"):
        query_features(torch.zeros(4, 1))


def test_query_space_maps_queries_into_the_clean_range():
    seen = []

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3 * 12 * 12, 4)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    items = [torch.full((3, 12, 12), v) for v in (0.2, 0.6)]  # per-channel range [0.2, 0.6]
    space = query_space(load_target(Recorder()), items)
    assert space.shape == (3, 12, 12)
    seen.clear()
    logits = space.run(torch.ones((2, 3, 4, 4)))
    assert logits.shape == (2, 4)
    assert torch.allclose(seen[-1], torch.full((2, 3, 12, 12), 0.6))  # u = 1 is the top of the range, resized
    space.run(torch.zeros((1, 3, 4, 4)))
    assert torch.allclose(seen[-1], torch.full((1, 3, 12, 12), 0.2))
    with pytest.raises(ValueError, match="at least one clean item"):
        query_space(load_target(Recorder()), [])


def test_query_tuning_finds_a_planted_trigger_on_unseen_models(tmp_path):
    train = [_space(Planted(s, t)) for s, t in [(0, 0), (1, 1), (2, 2), (3, 3)]]
    train += [_space(Planted(s)) for s in (10, 11, 12, 13)]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    config = QueryProbeConfig(queries=4, side=4, epochs=30, lr=0.05, seed=SEED)
    probe = train_query_probe(train, labels, config)
    # models it never saw: other seeds, other targets
    backdoored = [probe.score(_space(Planted(s, t))) for s, t in [(20, 7), (21, 8), (22, 5)]]
    clean = [probe.score(_space(Planted(s))) for s in (30, 31, 32)]
    assert min(backdoored) > max(clean)
    # the same probe with its queries frozen at the random start separates them less (MNTD's ablation)
    frozen = train_query_probe(train, labels, QueryProbeConfig(**{**vars(config), "tune_queries": False}))
    frozen_bd = [frozen.score(_space(Planted(s, t))) for s, t in [(20, 7), (21, 8), (22, 5)]]
    frozen_clean = [frozen.score(_space(Planted(s))) for s in (30, 31, 32)]
    assert min(backdoored) - max(clean) > min(frozen_bd) - max(frozen_clean) + 1.0
    # saved as safetensors, loaded back to the same scores
    probe.save(tmp_path)
    again = QueryProbe.load(tmp_path)
    assert again.score(_space(Planted(20, 7))) == pytest.approx(backdoored[0], abs=1e-5)


def test_frozen_queries_stay_at_their_start_and_bad_input_is_refused():
    spaces = [_space(Planted(0, 0)), _space(Planted(10))]
    config = QueryProbeConfig(queries=2, side=4, epochs=2, tune_queries=False)
    start = QueryProbe(config).queries()
    probe = train_query_probe(spaces, [1, 0], config)
    assert torch.equal(probe.queries(), start)
    with pytest.raises(ValueError, match="both backdoored"):
        train_query_probe(spaces, [1, 1], config)
    with pytest.raises(ValueError, match="as many labels"):
        train_query_probe(spaces, [1], config)
    with pytest.raises(ValueError, match="queries must be >= 1"):
        QueryProbeConfig(queries=0)
    assert np.isfinite(probe.score(spaces[0]))
