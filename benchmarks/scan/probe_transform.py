"""Development probe (issue #32): how easily one input-agnostic transformation drives every clean sample to a class.

A backdoor whose trigger changes the whole input a little (SIG's sinusoid, a colour filter) leaves a target class
that one small transformation, shared by all inputs, reaches from every clean sample. For each class ``c`` this
probe ascends the mean log-probability of ``c`` on the clean samples (the scan's 20, in the synthesis space's pixel
units) over one shared transformation of two families, each at a few budgets:

- ``additive``: ``x + d``, ``|d| <= budget * span`` per entry (a universal perturbation);
- ``colour``: ``a * x + b`` per channel, ``|a - 1| <= budget`` and ``|b| <= budget * span`` (a global tone / colour
  change: contrast, brightness, tint).

A class's reach in a family is its mean flip rate over the budgets (over the samples not already predicted ``c``);
the statistic is the largest robust z of the reach over the classes. Nothing here is in the library or the shipped
scan: it measures whether the idea separates backdoored from clean models before a source is built from it, on zoos
that are development data (train zoos, and check zoos after their blind figures were written down).

    python benchmarks/scan/probe_transform.py --zoos artifacts/zoo/fresh_cv artifacts/zoo/unseen_cv_2 \
        --out benchmarks/scan/results/probe_transform.json
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc
from metashield_hf.scan.synthesis import synthesis_space
from metashield_hf.zoo import sweep_zoo_rows

N_CLEAN, MAD = 20, 1.4826
FAMILIES = {"additive": [0.01, 0.02, 0.04, 0.08], "colour": [0.05, 0.1, 0.2, 0.3]}


@dataclass
class ProbeArguments:
    zoos: list[str] = field(metadata={"help": "Zoo folders."})
    out: str = field(metadata={"help": "JSON file of per-model results (resumable)."})
    steps: int = field(default=10, metadata={"help": "Ascent steps per budget."})
    domains: list[str] = field(default_factory=lambda: ["cv", "fl"], metadata={"help": "Domains to probe."})
    workdir: str = field(default="artifacts/scan_work_probe", metadata={"help": "Where checkpoints are unpacked."})


def clean_space(adapter, items):
    """The synthesis space of the clean samples and the model's predictions on them (once per model)."""
    space = synthesis_space(adapter, items)
    if space.kind != "pixels" or space.inputs is None:
        raise ValueError(f"the probe needs a pixel space, got {space.kind}")
    with torch.no_grad():
        logits, _ = space.run(torch.ones((space.num_samples, *space.mask_shape[1:])), space.inputs.float(), 1)
    return space, logits.argmax(-1), logits.shape[1]


def flip_rates(space, pred: torch.Tensor, k: int, family: str, budgets: list[float], steps: int) -> np.ndarray:
    """Per class and budget, the share of clean samples (not predicted as the class) one transformation flips."""
    x = space.inputs.float()
    n, ch = x.shape[0], x.shape[1]
    low, high = space.low.float(), space.high.float()
    span = (high - low).clamp_min(1e-6)
    classes = torch.arange(k).repeat_interleave(n)
    ones = torch.ones((k * n, *space.mask_shape[1:]))
    xs = x.repeat(k, *([1] * (x.dim() - 1)))
    other = (pred[None, :] != torch.arange(k)[:, None]).float()
    mid = (low + high) / 2
    rates = np.zeros((k, len(budgets)))
    for b, budget in enumerate(budgets):
        if family == "additive":
            params = torch.zeros((k, *x.shape[1:]), requires_grad=True)
            limit = budget * span
        else:  # per class and channel: a gain around the range's middle and a shift
            params = torch.zeros((k, 2, ch, *([1] * (x.dim() - 2))), requires_grad=True)
            limit = None
        for step in range(steps + 1):
            if family == "additive":
                rows = xs + params.repeat_interleave(n, 0)
            else:
                gain = 1 + params[:, 0].repeat_interleave(n, 0)
                shift = params[:, 1].repeat_interleave(n, 0) * span
                rows = (xs - mid) * gain + mid + shift
            out, _ = space.run(ones, rows.clamp(low, high), k)
            if step == steps:
                break
            loss = -torch.log_softmax(out, -1).gather(1, classes[:, None]).mean()
            (grad,) = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if family == "additive":
                    params -= (limit / 4) * grad.sign()
                    params.copy_(torch.maximum(torch.minimum(params, limit), -limit))
                else:
                    params -= (budget / 4) * grad.sign()
                    params.clamp_(-budget, budget)
        hit = (out.argmax(-1) == classes).view(k, n).float()
        rates[:, b] = ((hit * other).sum(1) / other.sum(1).clamp_min(1)).numpy()
    return rates


def robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    return (values - med) / max(MAD * np.median(np.abs(values - med)), 1e-2)


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)

    def measure(adapter, inputs) -> dict:
        space, pred, k = clean_space(adapter, inputs)
        rec = {}
        for family, budgets in FAMILIES.items():
            rates = flip_rates(space, pred, k, family, budgets, args.steps)
            z = robust_z(rates.mean(1))
            rec[family] = {"rates": rates.tolist(), "z_max": float(z.max()), "top_class": int(z.argmax())}
        return rec

    done = sweep_zoo_rows(args.zoos, args.out, measure, domains=args.domains, workdir=args.workdir, n_clean=N_CLEAN)
    for zoo_name in dict.fromkeys(r["zoo"] for r in done.values()):
        rows = [r for r in done.values() if r["zoo"] == zoo_name]
        y = np.array([r["is_backdoored"] for r in rows])
        bd = [r for r in rows if r["is_backdoored"]]
        for family in [*FAMILIES, "max"]:
            s = np.array(
                [max(r[f]["z_max"] for f in FAMILIES) if family == "max" else r[family]["z_max"] for r in rows]
            )
            line = f"{zoo_name} {family}: {len(rows)} models ({y.sum()} bd), AUROC {auroc(s, y):.3f}"
            if family != "max":
                line += (
                    f", top class = target {np.mean([r[family]['top_class'] == r['target_label'] for r in bd]):.2f}"
                )
            for attack in sorted({r["attack"] for r in bd}):
                m = np.array([r["attack"] in (attack, "none") for r in rows])
                line += f"; {attack} {auroc(s[m], y[m]):.2f}"
            print(line)
        print(f"{zoo_name}: {np.mean([r['seconds'] for r in rows]):.1f} s/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
