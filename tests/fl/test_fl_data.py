"""The partitions (known answers) and the FEMNIST loader on the real shared files (skipped where the data folder is
absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metashield_hf.fl.data import dirichlet_partition
from metashield_hf.zoo.build import resolve_data_root

FEMNIST = resolve_data_root() / "femnist" / "train.parquet"


# ------------------------------------------------------------------------------------------------ partitioning
def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean over clients of the share of the client's most common class (1 = one class per client)."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_dirichlet_partition_is_seeded_and_covers_every_index_once():
    labels = np.repeat(np.arange(5), 40)
    for alpha in (0.1, 1.0, 100.0):
        parts = dirichlet_partition(labels, num_clients=8, alpha=alpha, seed=3)
        again = dirichlet_partition(labels, num_clients=8, alpha=alpha, seed=3)
        assert len(parts) == 8 and all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))  # each index exactly once
        assert all(len(p) >= 2 and np.array_equal(p, np.sort(p)) for p in parts)
        other = dirichlet_partition(labels, num_clients=8, alpha=alpha, seed=4)
        assert any(not np.array_equal(p, q) for p, q in zip(parts, other, strict=True))
    with pytest.raises(ValueError, match="10 samples cannot give 8 clients 2 samples each"):
        dirichlet_partition(np.arange(10) % 2, num_clients=8, alpha=1.0)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = np.repeat(np.arange(5), 60)
    skew = {
        alpha: np.mean([_label_skew(dirichlet_partition(labels, 6, alpha, seed=s), labels) for s in range(5)])
        for alpha in (1000.0, 1.0, 0.05)
    }
    assert skew[1000.0] < skew[1.0] < skew[0.05]
    assert skew[1000.0] < 0.3  # near IID: about 1/5 of each client is its top class
    assert skew[0.05] > 0.7  # mostly one class per client


@pytest.mark.skipif(not FEMNIST.exists(), reason=f"{FEMNIST} not found (set $METASHIELD_DATA)")
def test_femnist_writers_are_clients():
    from metashield_hf.fl.data import load_femnist_clients

    fed = load_femnist_clients()
    assert len(fed.clients) == len(fed.client_names) == 105 and fed.num_classes == 62
    assert sum(len(c) for c in fed.clients) == 14708
    assert sum(len(t) for t in fed.client_tests) == len(fed.test) == 1685
    x, y = fed.clients[0].x, fed.clients[0].y
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert 0 <= int(y.min()) and int(y.max()) < 62
    # dark ink on white: the background (median pixel) is white
    assert float(x.median()) > 0.9 and fed.background == "white"
    sub = load_femnist_clients(max_writers=10, seed=1)
    assert len(sub.clients) == 10 and set(sub.client_names) <= set(fed.client_names)
    assert sub.client_names == load_femnist_clients(max_writers=10, seed=1).client_names
    inv = load_femnist_clients(writers=fed.client_names[:2], invert=True)
    torch.testing.assert_close(inv.clients[0].x, 1.0 - x)
    with pytest.raises(ValueError, match="not FEMNIST writers"):
        load_femnist_clients(writers=["nobody"])
