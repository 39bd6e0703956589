"""The FEMNIST loader on the real shared files (skipped where the data folder is absent)."""

from __future__ import annotations

import pytest
import torch

from metashield_hf.zoo.build import resolve_data_root

FEMNIST = resolve_data_root() / "femnist" / "train.parquet"
pytestmark = pytest.mark.skipif(not FEMNIST.exists(), reason=f"{FEMNIST} not found (set $METASHIELD_DATA)")


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
