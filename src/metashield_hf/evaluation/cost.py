"""Cost figures: detection overhead per input relative to the target's own forward pass, adaptation
time, meta-training throughput and zoo build seconds per model — all measured, none assumed."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _best_of(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls (the least disturbed by other jobs on a shared machine)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def detection_overhead(adapter, detector, clean, inputs, *, k: int = 10, repeats: int = 3, seed: int = 0) -> dict:
    """Per-input cost of detection next to the target's own forward pass, measured in the same process and run.

    Args:
        adapter: the target adapter (its forward pass hooks the penultimate layer; that hook is what any
            activation-based detector needs, so it is counted in the forward pass, not in the overhead).
        detector: a MetaShield detector.
        clean: ``k`` or more clean inputs for the adaptation.
        inputs: inputs to time (a batch).
        k: clean samples used for adaptation.
        repeats: best-of repeats.

    Returns:
        ``forward_ms_per_input``, ``detect_ms_per_input`` (ψ against the reference + the detector), ``overhead_ratio``
        (their quotient) and ``adapt_s`` (reference, inner loop and threshold from ``k`` clean samples, target
        forward pass on them included).
    """
    from ..shield import adapt

    t0 = time.perf_counter()
    shield = adapt(detector, adapter, clean[:k], seed=seed)
    adapt_s = time.perf_counter() - t0
    n = len(inputs)
    with torch.no_grad():
        out = adapter(inputs)
        forward = _best_of(lambda: adapter(inputs), repeats)
        detect = _best_of(lambda: shield.score_features(shield.features_of(out)[1]), repeats)
    return {
        "forward_ms_per_input": 1e3 * forward / n,
        "detect_ms_per_input": 1e3 * detect / n,
        "overhead_ratio": detect / forward,
        "adapt_s": adapt_s,
        "n_inputs": n,
    }


def measure_costs(
    zoo_dir: str | Path, model_ids: Sequence[str], detector_dir: str | Path, *, n_inputs: int = 64
) -> list:
    """`detection_overhead` on zoo models loaded from their rows (``model_ids``: a few per domain)."""
    from ..modeling_metashield import MetaShieldDetector
    from ..zoo import load_zoo, row_probe, row_to_target

    detector = MetaShieldDetector.from_pretrained(str(detector_dir)).eval()
    zoo = load_zoo(zoo_dir)
    index = {m: i for i, m in enumerate(zoo.select_columns(["model_id"])["model_id"])}
    rows = []
    for mid in model_ids:
        if mid not in index:
            logger.warning("cost: %s is not in the zoo %s; skipped", mid, zoo_dir)
            continue
        row = zoo[index[mid]]
        with tempfile.TemporaryDirectory() as work:
            adapter = row_to_target(row, work)
            clean, _, _ = row_probe(row)
            res = detection_overhead(adapter, detector, clean[:10], clean[10 : 10 + n_inputs])
        rows.append({"model_id": mid, "domain": row["domain"], "architecture": row["architecture"], **res})
        logger.info("cost %s: overhead x%.2f", mid, res["overhead_ratio"])
    return rows


def zoo_seconds(zoo_dir: str | Path) -> dict:
    """Build seconds per accepted model from the zoo's metadata (``train_seconds`` per row), per domain."""
    from ..zoo import load_zoo

    meta = load_zoo(zoo_dir, config_name="metadata")
    cols = meta.select_columns(["domain", "train_seconds"])
    out = {}
    for dom in sorted(set(cols["domain"])) + ["all"]:
        secs = [s for d, s in zip(cols["domain"], cols["train_seconds"], strict=True) if dom in ("all", d)]
        out[dom] = {"n": len(secs), "median_s": float(np.median(secs)), "total_s": float(np.sum(secs))}
    return out


def training_throughput(detector_dirs: dict[str, str]) -> dict:
    """Meta-training episodes/s recorded by `metashield train` (``metrics.json`` beside each ``detector/``)."""
    out = {}
    for name, d in detector_dirs.items():
        path = Path(d).parent / "metrics.json"
        if path.exists():
            m = json.loads(path.read_text())
            out[name] = {k: m[k] for k in ("episodes_per_s", "num_processes", "steps", "episodes", "seconds")}
    return out
