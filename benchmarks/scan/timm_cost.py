"""Wall time of a default ``scan_model`` on timm's ``test_resnet`` at its own input size and at lower resolutions.

    python benchmarks/scan/timm_cost.py --label default --input_sizes 160 64

The model is ``timm.create_model("test_resnet", pretrained=False, num_classes=10)`` (random weights: the cost of a
scan does not depend on what the weights learned), the clean samples are ``--n`` CIFAR-10 test images (two per class,
from ``--data``/cifar10/test.parquet; random images where that file is absent), and each input size is one scan with
``ScanConfig()``'s defaults plus ``--options`` (JSON), through timm's own eval transform at that size
(``create_transform(input_size=(3, S, S))``: resize, centre crop, normalise). The scan's own cost estimate (the INFO
line of ``metashield_hf.scan.progress``), the verdict, the seconds and the load average of the machine before and
after each scan are recorded; the entries of ``--label`` replace that label's in ``results/timm_cost.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class TimmCostArguments:
    """Flags of the timm scan-cost benchmark."""

    label: str = field(default="default", metadata={"help": "Name of this measurement in the results."})
    input_sizes: list[int] = field(
        default_factory=lambda: [160, 64], metadata={"help": "Square input sizes to scan at (160: the model's own)."}
    )
    n: int = field(default=20, metadata={"help": "Clean samples."})
    options: str = field(default="{}", metadata={"help": "ScanConfig fields as JSON, e.g. '{\"steps\": 40}'."})
    data: str = field(
        default=os.environ.get("METASHIELD_DATA", "../shared/data"),
        metadata={"help": "Folder holding cifar10/test.parquet (relative to the working directory)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model, the images and the scan."})


def clean_images(data: str, n: int, seed: int) -> tuple[list, str]:
    """``n`` CIFAR-10 test images as PIL (an equal share per class), or random RGB images where the file is absent."""
    import numpy as np
    from PIL import Image

    file = Path(data) / "cifar10" / "test.parquet"
    if file.is_file():
        from datasets import load_dataset

        test = load_dataset("parquet", data_files={"test": str(file)}, split="test")
        labels = np.asarray(test["label"])
        per_class = -(-n // 10)
        rows = [int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:per_class]][:n]
        return [test[i]["image"].convert("RGB") for i in rows], f"CIFAR-10 test ({file.name}, {per_class} per class)"
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)], "random 32x32 RGB"


class _CostLine(logging.Handler):
    """Keeps the scan's logged cost estimate."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def scan_once(images: list, size: int, options: dict, seed: int) -> dict:
    """One default scan of a fresh ``test_resnet`` at ``size`` x ``size``: seconds, verdict and the cost estimate."""
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    from metashield_hf import load_detector, scan_model
    from metashield_hf.scan import ScanConfig

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    data_config = resolve_data_config(model=model) | {"input_size": (3, size, size)}
    transform = create_transform(**data_config)
    detector = load_detector()
    config = ScanConfig(progress=False, seed=seed, device="cpu").replace(**options)
    cost = _CostLine()
    progress_logger = logging.getLogger("metashield_hf.scan.progress")
    progress_logger.addHandler(cost)
    progress_logger.setLevel(logging.DEBUG)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        report = scan_model(model, images, detector, config, processor=transform)
    finally:
        progress_logger.removeHandler(cost)
    seconds = time.perf_counter() - t0
    return {
        "input_size": size,
        "model_input_size": list(model.pretrained_cfg["input_size"]),
        "seconds": round(seconds, 1),
        "verdict": report.verdict,
        "score": round(float(report.score), 4),
        "options": {k: v for k, v in report.options.items() if k not in ("head",)},
        "timings_s": {k: round(float(v), 1) for k, v in report.timings.items()},
        "cost_estimate": cost.lines[-1] if cost.lines else None,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _commit() -> str | None:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(TimmCostArguments).parse_args_into_dataclasses(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = _commit()  # the code the scans run, read before they start (they take minutes)
    images, source = clean_images(args.data, args.n, args.seed)
    runs = []
    for size in args.input_sizes:
        runs.append(scan_once(images, size, json.loads(args.options), args.seed))
        print(json.dumps(runs[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "timm_cost.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = {
        "commit": commit,
        "clean_samples": f"{args.n} {source}",
        "extra_options": json.loads(args.options),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "runs": runs,
    }
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
