"""Federated learning: screen client updates (``score_client_updates``), a Flower strategy that drops or
down-weights flagged clients (``MetaShieldStrategy``), the baselines on the same rounds, FL data loaders and
partitions, and an in-process FedAvg/FedProx simulator with malicious clients (``run_federated``).

``flwr`` is optional (``pip install "metashield-hf[fl]"``): ``score_client_updates``, the norm and cosine baselines,
the loaders and the simulator work without it; ``MetaShieldStrategy`` and ``flower_aggregate`` import it when first
used.
"""

from __future__ import annotations

from typing import Any

from .baselines import cosine_clusters, norm_outliers
from .calibration import ClientEvidence, EvidenceSettings, ScreenCalibration, client_evidence
from .data import (
    ClientData,
    FederatedData,
    dirichlet_partition,
    load_femnist_clients,
    load_mnist_clients,
    natural_partition,
)
from .federation import FedConfig, FedResult, fedavg_aggregate, local_train, run_federated
from .screen import ClientScore, calibrated_scores, candidate_state, robust_z, score_client_updates, to_deltas

__all__ = [
    "ClientData",
    "ClientEvidence",
    "ClientScore",
    "EvidenceSettings",
    "FedConfig",
    "FedResult",
    "FederatedData",
    "MetaShieldStrategy",
    "ScreenCalibration",
    "calibrated_scores",
    "candidate_state",
    "client_evidence",
    "cosine_clusters",
    "dirichlet_partition",
    "fedavg_aggregate",
    "flower_aggregate",
    "load_femnist_clients",
    "load_mnist_clients",
    "local_train",
    "natural_partition",
    "norm_outliers",
    "robust_z",
    "run_federated",
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
