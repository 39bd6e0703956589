"""Session fixture: the tiny zoo (configs/zoo/tiny.yaml), built once into a temporary folder and finalized."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "zoo" / "tiny.yaml"
STANDARD = REPO / "configs" / "zoo" / "standard.yaml"


@pytest.fixture(scope="session")
def tiny_config():
    from metashield_hf.zoo import ZooConfig

    return ZooConfig.from_yaml(TINY)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory, tiny_config):
    """``(out_dir, build_report, build_seconds)`` of the tiny zoo, finalized."""
    from metashield_hf.zoo import build_zoo, finalize_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    start = time.perf_counter()
    report = build_zoo(tiny_config, out, progress=False)
    seconds = time.perf_counter() - start
    finalize_zoo(out)
    return out, report, seconds
