"""Cost and per-class evidence of the trigger-agnostic sources (max-margin, feature inversion) on the digits models.

    python benchmarks/scan/trigger_agnostic_cost.py --repeats 3

The bundled digits TinyCNN with its BadNets patch (target 0) and its clean twin, 20 clean samples each, one torch
thread. Each model is scanned with ``ScanConfig()``'s defaults with both sources off, then with each one alone at its
budget; the median over ``--repeats`` scans of each variant's ``total_s`` and of the source's own timing are recorded,
with the per-class margins and feature sizes, in ``results/trigger_agnostic_cost.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class TriggerAgnosticCostArguments:
    """Flags of the trigger-agnostic cost benchmark."""

    repeats: int = field(default=3, metadata={"help": "Scans per variant (the median is recorded)."})
    n: int = field(default=20, metadata={"help": "Clean samples per scan."})
    max_margin_steps: int = field(default=20, metadata={"help": "Budget of the max-margin variant."})
    feature_steps: int = field(default=20, metadata={"help": "Budget of the feature-inversion variant."})
    out: str = field(default=str(RESULTS / "trigger_agnostic_cost.json"), metadata={"help": "Where to write."})


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import HfArgumentParser

    from metashield_hf.scan import ScanConfig, scan_model
    from metashield_hf.zoo.examples import digits_badnets_example

    (args,) = HfArgumentParser(TriggerAgnosticCostArguments).parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    off = dict(max_margin_steps=0, feature_steps=0)
    variants = {
        "off": off,
        "max_margin": {**off, "max_margin_steps": args.max_margin_steps},
        "feature": {**off, "feature_steps": args.feature_steps},
    }
    models = {"badnets": digits_badnets_example(seed=0), "clean": digits_badnets_example(seed=0, poison_rate=0.0)}
    scan_model(models["clean"].model, models["clean"].clean_pool[: args.n])  # warm-up: loads the detector once
    rows = []
    for model_name, example in models.items():
        for variant, options in variants.items():
            reports = [
                scan_model(example.model, example.clean_pool[: args.n], config=ScanConfig(**options))
                for _ in range(args.repeats)
            ]
            last = reports[-1]
            own = {"max_margin": "max_margin_s", "feature": "feature_s"}.get(variant)
            rows.append(
                {
                    "model": model_name,
                    "variant": variant,
                    "options": options,
                    "total_s": statistics.median(r.timings["total_s"] for r in reports),
                    "source_s": statistics.median(r.timings[own] for r in reports) if own else None,
                    "score": last.score,
                    "signals": {k: v for k, v in last.signals.items() if k.startswith(("max_margin", "feature"))},
                    "max_margin": [c.max_margin for c in last.per_class] if variant == "max_margin" else None,
                    "feature_size": [c.feature_size for c in last.per_class] if variant == "feature" else None,
                    "feature_layer": last.options.get("feature_layer"),
                }
            )
            print(json.dumps({k: rows[-1][k] for k in ("model", "variant", "total_s", "source_s", "signals")}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1, "load": os.getloadavg()}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
