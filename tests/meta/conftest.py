"""Meta-learning fixtures: the tiny zoo's activation cache (built once per session) and small synthetic tasks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_cache(tiny_zoo, tmp_path_factory):
    """``(zoo_dir, cache_dir, zoo)``: every tiny-zoo model's probe activations, cached once per session."""
    from metashield_hf.meta.cache import cache_activations
    from metashield_hf.zoo import load_zoo

    zoo_dir = tiny_zoo[0]
    zoo = load_zoo(zoo_dir)
    cache_dir = tmp_path_factory.mktemp("activations")
    cache_activations(zoo, cache_dir, progress=False)
    return zoo_dir, cache_dir, zoo


def _synthetic_task(n: int = 40, dim: int = 16, classes: int = 4, *, backdoored: bool = True, seed: int = 0):
    """A task whose triggered activations are the clean ones shifted along one direction (seeded)."""
    from metashield_hf.meta.cache import TaskActivations
    from metashield_hf.targets.base import TargetOutput

    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)
    clean = torch.randn(n, dim, generator=g)
    triggered = clean + 3.0 * torch.randn(1, dim, generator=g)
    meta = {"model_id": f"synthetic-{seed}", "domain": "cv", "attack": "badnets" if backdoored else "none"}
    meta["is_backdoored"] = backdoored
    return TaskActivations(
        meta=meta,
        clean=TargetOutput(clean @ w.T + b, clean),
        triggered=TargetOutput(triggered @ w.T + b, triggered),
        labels=torch.zeros(n, dtype=torch.long),
        head_weight=w,
        head_bias=b,
    )


@pytest.fixture
def synthetic_task():
    """Factory of small seeded tasks (fast: no zoo needed)."""
    return _synthetic_task


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The detector's tensors are tiny: on a shared 2-core box, intra-op threads make these tests ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
