"""The Neural Cleanse baseline on the scan's own synthesis, so that both scans compare on equal terms.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019
(https://doi.org/10.1109/SP.2019.00031).
"""

from __future__ import annotations

import time

import numpy as np

from ..targets import load_target, target_device
from .report import ScanReport
from .scanner import checkpoint_name, class_evidence, prepare_clean_items, run_synthesis
from .signals import synthesis_signals

#: Wang et al. 2019: anomaly index > 2 => backdoored (about 95% for a normal distribution).
NEURAL_CLEANSE_THRESHOLD = 2.0


def neural_cleanse_scan(
    checkpoint,
    clean_samples,
    *,
    processor=None,
    n: int | None = None,
    steps: int = 60,
    lr: float = 0.3,
    flip_threshold: float = 0.99,
    class_batch: int = 16,
    threshold: float = NEURAL_CLEANSE_THRESHOLD,
    seed: int = 0,
    batch_size: int = 32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device: str | None = None,
) -> ScanReport:
    """Neural Cleanse baseline: per-class mask + pattern reverse engineering and the MAD anomaly index.

    Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019
    (https://doi.org/10.1109/SP.2019.00031). The trigger of each class is the smallest mask (with its pattern) that
    flips ``flip_threshold`` (the paper: 99%) of the clean samples; the model is flagged when the smallest mask's
    anomaly index exceeds ``threshold`` (the paper: 2). It runs the same synthesis as [`scan_model`] (so the two
    compare on equal terms) without the detector and the learned head.

    Args:
        checkpoint / clean_samples / processor / n / seed / batch_size / trust_remote_code / allow_pickle / device: as
            in [`scan_model`].
        steps / lr / flip_threshold / class_batch: the synthesis settings.
        threshold: anomaly index above which the verdict is ``"backdoored"``.

    Returns:
        A [`ScanReport`] with ``method="neural_cleanse"`` and ``score`` = the anomaly index (unbounded).

    Example:
        ```python
        >>> nc = neural_cleanse_scan(model, clean_images[:20])
        >>> nc.verdict, nc.suspected_target, nc.anomaly_index
        ('backdoored', 0, 3.7)
        ```
    """
    t0 = time.perf_counter()
    adapter = load_target(
        checkpoint,
        processor,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        device=target_device(checkpoint, device),
    )
    items = prepare_clean_items(adapter, clean_samples, n, seed)
    t_load = time.perf_counter()
    _, result, anomaly = run_synthesis(
        adapter, items, steps=steps, lr=lr, flip_threshold=flip_threshold, class_batch=class_batch, seed=seed,
        stage="neural cleanse synthesis",
    )  # fmt: skip
    t1 = time.perf_counter()
    target = int(np.argmax(anomaly))
    evidence = class_evidence(adapter, result, anomaly)
    sizes = result.sizes
    return ScanReport(
        checkpoint=checkpoint_name(checkpoint),
        method="neural_cleanse",
        verdict="backdoored" if anomaly[target] > threshold else "clean",
        score=float(anomaly[target]),
        threshold=threshold,
        suspected_target=target,
        suspected_target_label=evidence[target].label,
        anomaly_index=float(anomaly[target]),
        signals=synthesis_signals(anomaly, sizes, target),
        per_class=evidence,
        n_clean_samples=len(items),
        space=result.kind,
        timings={"load_s": t_load - t0, "synthesis_s": t1 - t_load, "total_s": t1 - t0},
        options={"steps": steps, "lr": lr, "flip_threshold": flip_threshold, "seed": seed},
    )
