"""Federated data: a client's data (``ClientData``), the Dirichlet and natural partitions, FEMNIST writers as
clients (LEAF), and MNIST with a Dirichlet(α) split.

Both are read from the shared data folder (``$METASHIELD_DATA``, else ``data_root``, else ``../shared/data`` beside
the repo, as the zoo resolves it) with `datasets` (through ``zoo.fl.load_fl_arrays``, cached per process), and come
back as ``ClientData`` of ``(N, 1, 28, 28)`` floats in ``[0, 1]`` — the format of the in-process FL loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..attacks.base import check_float, check_int

logger = logging.getLogger(__name__)

FEMNIST_NUM_CLASSES = 62


# ------------------------------------------------------------------------------------------------ data partitioning
def dirichlet_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed non-IID split: each class is divided among clients in Dirichlet(α) proportions.

    The usual FL benchmark split (Hsu et al. 2019, https://arxiv.org/abs/1909.06335). Draws are repeated until
    every client has at least ``min_size`` samples (as common implementations do).

    Args:
        labels: ``(N,)`` class of each sample.
        num_clients: number of parts.
        alpha: concentration; ``alpha → ∞`` is IID, ``alpha → 0`` gives one class per client.
        seed: seeds the draw.
        min_size: smallest allowed client.

    Returns:
        ``num_clients`` sorted index arrays that together hold every index exactly once.

    Example:
        ```python
        parts = dirichlet_partition([0, 1] * 50, num_clients=4, alpha=0.5, seed=0)
        sorted(np.concatenate(parts)) == list(range(100))   # True
        ```
    """
    labels = np.asarray(labels)
    check_int("num_clients", num_clients, minimum=1)
    check_float("alpha", alpha, 1e-6)
    if num_clients * min_size > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} samples each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) split gave every client {min_size} samples; raise alpha")


def natural_partition(groups: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """One client per distinct group value (e.g. FEMNIST writer), in sorted group order."""
    groups = np.asarray(groups)
    return [np.flatnonzero(groups == g) for g in np.unique(groups)]


@dataclass
class ClientData:
    """A client's local data: ``x`` ``(N, C, H, W)`` float in ``[0, 1]`` (before normalization), ``y`` ``(N,)``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class FederatedData:
    """Clients and a pooled test set.

    Attributes:
        clients: one [`ClientData`] per client (training data), in ``client_names`` order.
        client_names: FEMNIST writer ids, or ``"client_<k>"`` for a Dirichlet split.
        test: the pooled test set (FEMNIST: the test rows of the kept writers; MNIST: the official test set).
        client_tests: FEMNIST only: each writer's own test rows (``None`` for MNIST).
        num_classes: label count (62 for FEMNIST, 10 for MNIST).
        background: ``"white"`` (FEMNIST: dark ink on white) or ``"black"`` (MNIST).
    """

    clients: list[ClientData]
    client_names: list[str]
    test: ClientData
    client_tests: list[ClientData] | None
    num_classes: int
    background: str


def _grey(x_rgb: np.ndarray) -> torch.Tensor:
    """RGB ``uint8`` ``(N, H, W, 3)`` (grey replicated) -> ``(N, 1, H, W)`` float in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(x_rgb[..., 0]))[:, None].float() / 255.0


def _root(data_root: str | os.PathLike | None) -> str:
    from ..zoo.build import resolve_data_root

    return str(resolve_data_root(data_root))


def load_femnist_clients(
    data_root: str | os.PathLike | None = None,
    *,
    max_writers: int | None = None,
    min_samples: int = 1,
    writers: Sequence[str] | None = None,
    invert: bool = False,
    seed: int = 0,
) -> FederatedData:
    """FEMNIST (LEAF) with each writer as one client.

    Reads ``<data_root>/femnist/{train,test}.parquet`` (105 writers, 62 classes ``0-9A-Za-z``, 28×28 grey, dark ink on
    white; see the data MANIFEST) with `datasets`.

    Args:
        data_root: the shared data folder (default as the zoo resolves it: ``$METASHIELD_DATA``, ``../shared/data``).
        max_writers: keep a seeded random subset of this many writers (``None``: all).
        min_samples: drop writers with fewer training samples.
        writers: keep exactly these writer ids (overrides ``max_writers``).
        invert: return ``1 - x`` (white ink on black, like MNIST); the default keeps the data as it is.
        seed: seeds the writer subset.

    Returns:
        A [`FederatedData`]: per-writer training [`ClientData`], per-writer and pooled test sets.

    Example:
        ```python
        >>> fed = load_femnist_clients(max_writers=20)
        >>> len(fed.clients), fed.clients[0].x.shape[1:], fed.num_classes
        (20, torch.Size([1, 28, 28]), 62)
        ```
    """
    from ..zoo.fl import load_fl_arrays

    x_tr, y_tr, g_tr, x_te, y_te = load_fl_arrays("femnist", _root(data_root))
    # The test split has no writer column in load_fl_arrays; read it here (small) to keep per-writer test sets.
    g_te = _femnist_test_writers(_root(data_root))
    names = sorted(set(g_tr.tolist()))
    counts = {w: int(c) for w, c in zip(*np.unique(g_tr, return_counts=True), strict=True)}
    names = [w for w in names if counts[w] >= min_samples]
    if writers is not None:
        missing = sorted(set(writers) - set(names))
        if missing:
            raise ValueError(f"writers {missing[:5]} are not FEMNIST writers (with >= {min_samples} samples)")
        names = sorted(writers)
    elif max_writers is not None and max_writers < len(names):
        names = sorted(np.random.default_rng(seed).choice(names, size=max_writers, replace=False).tolist())
    x_train, x_test = _grey(x_tr), _grey(x_te)
    if invert:
        x_train, x_test = 1.0 - x_train, 1.0 - x_test
    y_train, y_test = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    clients, tests = [], []
    for w in names:
        tr, te = torch.from_numpy(np.flatnonzero(g_tr == w)), torch.from_numpy(np.flatnonzero(g_te == w))
        clients.append(ClientData(x_train[tr], y_train[tr]))
        tests.append(ClientData(x_test[te], y_test[te]))
    pooled = torch.from_numpy(np.flatnonzero(np.isin(g_te, names)))
    logger.info("FEMNIST: %d writers, %d train / %d test samples", len(names), sum(map(len, clients)), len(pooled))
    return FederatedData(
        clients, names, ClientData(x_test[pooled], y_test[pooled]), tests, FEMNIST_NUM_CLASSES,
        "black" if invert else "white",
    )  # fmt: skip


def _femnist_test_writers(root: str) -> np.ndarray:
    import datasets

    path = os.path.join(root, "femnist", "test.parquet")
    ds = datasets.load_dataset("parquet", data_files={"test": path}, split="test", columns=["writer"])
    return np.asarray(ds["writer"])


def load_mnist_clients(
    data_root: str | os.PathLike | None = None,
    *,
    num_clients: int = 20,
    alpha: float = 0.5,
    train_size: int | None = 6000,
    test_size: int | None = 2000,
    seed: int = 0,
) -> FederatedData:
    """MNIST split over ``num_clients`` clients in Dirichlet(``alpha``) label proportions.

    Args:
        data_root: the shared data folder (as in [`load_femnist_clients`]).
        num_clients / alpha: the split (:func:`dirichlet_partition`; smaller ``alpha`` = more skewed).
        train_size / test_size: seeded subsets (``None``: all 60,000 / 10,000).
        seed: seeds the subsets and the split.
    """
    from ..zoo.fl import load_fl_arrays

    x_tr, y_tr, _, x_te, y_te = load_fl_arrays("mnist", _root(data_root))
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(len(y_tr), size=min(train_size or len(y_tr), len(y_tr)), replace=False))
    te = np.sort(rng.choice(len(y_te), size=min(test_size or len(y_te), len(y_te)), replace=False))
    x, y = _grey(x_tr[tr]), torch.from_numpy(y_tr[tr])
    parts = dirichlet_partition(y.numpy(), num_clients, alpha, seed=seed)
    clients = [ClientData(x[torch.from_numpy(p)], y[torch.from_numpy(p)]) for p in parts]
    test = ClientData(_grey(x_te[te]), torch.from_numpy(y_te[te]))
    return FederatedData(clients, [f"client_{k}" for k in range(num_clients)], test, None, 10, "black")
