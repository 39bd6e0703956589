"""Does the dormancy point to the target on small digits models? A known-answer check of the dormant shortcut weights.

The bundled digits TinyCNN with its BadNets patch (target 0) and its clean twin, then 256-unit MLPs on the same 8x8
digits, clean and with 10% of the non-target rows poisoned by BadNets, SIG or blend (30 epochs, seeds 0 and 1): for
each model, the class with the largest dormant mass, ``dormant_excess`` and the attack success rate.

    python benchmarks/scan/dormancy_digits.py     # writes results/dormancy_digits.md (about a minute on a CPU)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import HfArgumentParser

from metashield_hf.attacks import ATTACKS
from metashield_hf.scan import dormant_mass, dormant_signals
from metashield_hf.targets import load_target
from metashield_hf.zoo.examples import digits_badnets_example, digits_split, train_on_tensors

HERE = Path(__file__).resolve().parent
ATTACK_SPECS = {  # name -> (registry name, parameters, target)
    "badnets": ("badnets", {"patch_size": 2, "location": "bottom_right", "pattern": "white"}, 0),
    "sig": ("sig", {"delta": 0.2, "frequency": 2}, 5),
    "blend": ("blend", {}, 3),
}


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Training seeds of the MLPs."})
    out: str = field(default=str(HERE / "results" / "dormancy_digits.md"), metadata={"help": "The table."})


def dormancy(model: nn.Module, clean: torch.Tensor) -> tuple[int, float]:
    adapter = load_target(model)
    with torch.no_grad():
        out = adapter(list(clean))
    mass = dormant_mass(adapter.head.weight, out.penultimate)
    return int(np.argmax(mass)), dormant_signals(mass)["dormant_excess"]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)
    rows = []
    for poison_rate, name in ((None, "badnets"), (0.0, "none")):
        example = digits_badnets_example(seed=0, **({} if poison_rate is None else {"poison_rate": poison_rate}))
        top, excess = dormancy(example.model, example.clean_pool[:20])
        target = example.target_label if name != "none" else None
        rows.append(("TinyCNN (bundled)", name, 0, target, top, excess, example.attack_success_rate))
    xtr, ytr, xte, yte = digits_split(0)
    for name, spec in {"none": None, **ATTACK_SPECS}.items():
        for seed in args.seeds:
            xp, yp, target, attack = xtr.clone(), ytr.clone(), None, None
            if spec is not None:
                registered, params, target = spec
                attack = ATTACKS.build(registered, **params)
                chosen = torch.nonzero(ytr != target).squeeze(1)[: round(0.1 * len(xtr))]
                xp[chosen], yp[chosen] = attack.apply(xtr[chosen]), target
            torch.manual_seed(seed)
            model = train_on_tensors(mlp(), xp, yp, epochs=30, seed=seed)
            asr = None
            if attack is not None:
                with torch.no_grad():
                    asr = float((model(attack.apply(xte[yte != target])).argmax(-1) == target).float().mean())
            top, excess = dormancy(model, xte[:20])
            rows.append(("MLP 64-256-256-10", name, seed, target, top, excess, asr))
    lines = [
        "# Dormant shortcut weights on small digits models",
        "",
        "Written by `python benchmarks/scan/dormancy_digits.py`: the class with the largest dormant mass over 20 clean "
        "test digits, against the planted target.",
        "",
        "| model | attack | seed | target | largest-mass class | `dormant_excess` | ASR |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, name, seed, target, top, excess, asr in rows:
        lines.append(
            f"| {model} | {name} | {seed} | {'–' if target is None else target} | {top} | {excess:.2f} | "
            f"{'–' if asr is None else f'{asr:.2f}'} |"
        )
    hits = sum(r[3] == r[4] for r in rows if r[3] is not None)
    lines += [
        "",
        f"The largest mass is the target's in {hits} of {sum(r[3] is not None for r in rows)} backdoored models.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
