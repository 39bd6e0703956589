"""How the dormancy's form was picked: 24 variants of the per-class dormant mass on every image / FL zoo model.

Variants: the head's raw or class-specific weights (``w`` / ``wc``), each feature's mean or largest absolute
activation over the 20 clean probe inputs (``mean`` / ``max``), the floor (0.03 / 0.1 / 0.3), and the mass or the mass
over the used mass (``raw`` / ``ratio``). The statistic is the largest robust z over classes of the log mass; the
table gives its pooled AUROC, its AUROC per attack (each attack's models against all clean ones) and how often its
class is the target. The shipped form (`metashield_hf.scan.dormant_mass`) is ``max_wc_0.3_raw``. These zoos are
development for the choice, not held out.

    python benchmarks/scan/dormancy_variants.py --zoos artifacts/zoo/live_dev artifacts/zoo/fresh_cv \
        artifacts/zoo/unseen_cv_2 artifacts/zoo/live_blind3 artifacts/zoo/first_hour   # results/dormancy_variants.md
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc
from metashield_hf.scan import anomaly_indices
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

HERE = Path(__file__).resolve().parent
N_CLEAN = 20


@dataclass
class Args:
    zoos: list[str] = field(metadata={"help": "Zoo folders; their cv / fl models are read."})
    workdir: str = field(default="artifacts/scan_work", metadata={"help": "Where checkpoints are unpacked."})
    out: str = field(default=str(HERE / "results" / "dormancy_variants.md"), metadata={"help": "The table."})


def variants(weight: torch.Tensor, penultimate: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Per variant name, the largest robust z over classes of the log mass and its class."""
    out = {}
    stats = {"mean": penultimate.abs().mean(0), "max": penultimate.abs().max(0).values}
    weights = {"w": weight, "wc": weight - weight.mean(0, keepdim=True)}
    for (a_name, act), (w_name, w), floor in itertools.product(stats.items(), weights.items(), (0.03, 0.1, 0.3)):
        rel = act / act.mean().clamp(min=1e-12)
        positive = w.clamp(min=0)
        mass = (positive / (rel + floor)).sum(1).double().numpy()
        for form, value in (("raw", mass), ("ratio", mass / ((positive * rel).sum(1).double().numpy() + 1e-8))):
            z = anomaly_indices(-np.log(np.maximum(value, 1e-8)))
            out[f"{a_name}_{w_name}_{floor}_{form}"] = (float(z.max()), int(z.argmax()))
    return out


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    rows = []
    for path in args.zoos:
        zoo = load_zoo(path)
        for i in range(len(zoo)):
            row = zoo[i]
            if row["domain"] not in ("cv", "fl"):
                continue
            target = row_to_target(row, args.workdir)
            with torch.no_grad():
                out = target(row_probe(row)[0][:N_CLEAN])
            values = variants(target.head.weight.detach().float(), out.penultimate.float())
            rows.append({"attack": row["attack"], "bd": bool(row["is_backdoored"]), "target": row["target_label"]}
                        | {"v": values})  # fmt: skip
    y = np.array([r["bd"] for r in rows])
    attacks = sorted({r["attack"] for r in rows if r["bd"]})
    table = []
    for name in rows[0]["v"]:
        score = np.array([r["v"][name][0] for r in rows])
        per = [auroc(score[(~y) | np.array([r["attack"] == a for r in rows])],
                     y[(~y) | np.array([r["attack"] == a for r in rows])]) for a in attacks]  # fmt: skip
        hit = np.mean([r["v"][name][1] == r["target"] for r in rows if r["bd"]])
        table.append((auroc(score, y), name, hit, per))
    lines = [
        f"# Dormancy variants on {len(rows)} image / FL zoo models ({int(y.sum())} backdoored)",
        "",
        "Written by `python benchmarks/scan/dormancy_variants.py`; zoos: " + ", ".join(f"`{z}`" for z in args.zoos),
        "",
        "| variant | pooled AUROC | target acc. | " + " | ".join(attacks) + " |",
        "|---|---:|---:|" + "---:|" * len(attacks),
    ]
    for value, name, hit, per in sorted(table, reverse=True):
        lines.append(f"| `{name}` | {value:.3f} | {hit:.2f} | " + " | ".join(f"{p:.2f}" for p in per) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
