"""Zoo test constants. The session fixtures ``tiny_config`` and ``tiny_zoo`` live in tests/conftest.py, so that
tests/zoo and tests/meta share one build of the tiny zoo per session."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "zoo" / "tiny.yaml"
STANDARD = REPO / "configs" / "zoo" / "standard.yaml"
