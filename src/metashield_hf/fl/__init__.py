"""Federated learning: screen client updates (``score_client_updates``), a Flower strategy that drops or
down-weights flagged clients (``MetaShieldStrategy``), the baselines on the same rounds, and FL data loaders.

``flwr`` is optional (``pip install "metashield-hf[fl]"``): ``score_client_updates``, the norm and cosine baselines
and the loaders work without it; ``MetaShieldStrategy`` and ``flower_aggregate`` import it when first used.
"""

from __future__ import annotations

from typing import Any

from .baselines import cosine_clusters, norm_outliers
from .data import FederatedData, load_femnist_clients, load_mnist_clients
from .screen import ClientScore, candidate_state, robust_z, score_client_updates, to_deltas

__all__ = [
    "ClientScore",
    "FederatedData",
    "MetaShieldStrategy",
    "candidate_state",
    "cosine_clusters",
    "flower_aggregate",
    "load_femnist_clients",
    "load_mnist_clients",
    "norm_outliers",
    "robust_z",
    "score_client_updates",
    "to_deltas",
]

_FLOWER = {"MetaShieldStrategy": ".strategy", "flower_aggregate": ".flower", "build_replies": ".flower"}


def __getattr__(name: str) -> Any:
    # Lazy: importing metashield_hf.fl must not import flwr (an optional extra).
    if name in _FLOWER:
        import importlib

        return getattr(importlib.import_module(_FLOWER[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
