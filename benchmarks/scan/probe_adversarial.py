"""Development probe (issue #32): is a backdoor's target the class that small per-sample perturbations reach most?

A backdoor teaches a shortcut to its target class, so the target might be an adversarial attractor: from every clean
sample, a small targeted perturbation (one per sample, not shared, unlike ``probe_transform.py``) might reach it more
easily than any other class, whatever the trigger's shape. For each class ``c`` this probe runs targeted L-inf
sign-gradient ascent of ``log p(c)`` from each of the scan's 20 clean samples (in the synthesis space's pixel units,
projected to the clean range), at budgets of 1%, 2% and 4% of the range, 10 steps each; a class's reach at a budget
is the mean final ``log p(c)`` (``lp``) or the flip rate (``rate``) over the samples not already predicted ``c``. The
statistic is the largest robust z of the reach over the classes, per budget and averaged over budgets. Nothing here
is in the library or the shipped scan: it measures whether the idea separates backdoored from clean models before a
source is built from it, on train zoos.

    python benchmarks/scan/probe_adversarial.py --zoos artifacts/zoo/unseen_cv_2 artifacts/zoo/live_blind3 \
        artifacts/zoo/fresh_cv artifacts/zoo/live_dev artifacts/zoo/unseen_cv_3 \
        --out benchmarks/scan/results/probe_adversarial.json
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
BUDGETS = [0.01, 0.02, 0.04]


@dataclass
class ProbeArguments:
    zoos: list[str] = field(metadata={"help": "Zoo folders."})
    out: str = field(metadata={"help": "JSON file of per-model results (resumable)."})
    steps: int = field(default=10, metadata={"help": "Ascent steps per budget."})
    domains: list[str] = field(default_factory=lambda: ["cv", "fl"], metadata={"help": "Domains to probe."})
    workdir: str = field(default="artifacts/scan_work_adv", metadata={"help": "Where checkpoints are unpacked."})


def robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    return (values - med) / max(MAD * np.median(np.abs(values - med)), 1e-2)


def reach(space, pred: torch.Tensor, k: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class and budget: the flip rate and the mean final log-probability of the class, over the clean samples
    not predicted as it, after a targeted per-sample L-inf ascent."""
    x = space.inputs.float()
    n = x.shape[0]
    low, high = space.low.float(), space.high.float()
    span = (high - low).clamp_min(1e-6)
    classes = torch.arange(k).repeat_interleave(n)
    ones = torch.ones((k * n, *space.mask_shape[1:]))
    xs = x.repeat(k, *([1] * (x.dim() - 1)))
    other = (pred[None, :] != torch.arange(k)[:, None]).float()
    rates, logp = np.zeros((k, len(BUDGETS))), np.zeros((k, len(BUDGETS)))
    for b, budget in enumerate(BUDGETS):
        delta = torch.zeros_like(xs, requires_grad=True)
        limit = budget * span
        for step in range(steps + 1):
            out, _ = space.run(ones, (xs + delta).clamp(low, high), k)
            lp = torch.log_softmax(out.float(), -1).gather(1, classes[:, None]).squeeze(1)
            if step == steps:
                break
            (grad,) = torch.autograd.grad(-lp.sum(), delta)
            with torch.no_grad():
                delta -= (limit / 4) * grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, limit), -limit))
        hit = (out.argmax(-1) == classes).view(k, n).float()
        count = other.sum(1).clamp_min(1)
        rates[:, b] = ((hit * other).sum(1) / count).numpy()
        logp[:, b] = ((lp.detach().view(k, n) * other).sum(1) / count).numpy()
    return rates, logp


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)

    def measure(adapter, inputs) -> dict:
        space = synthesis_space(adapter, inputs)
        with torch.no_grad():
            logits, _ = space.run(torch.ones((space.num_samples, *space.mask_shape[1:])), space.inputs.float(), 1)
        rates, logp = reach(space, logits.argmax(-1), logits.shape[1], args.steps)
        return {"rates": rates.tolist(), "logp": logp.tolist()}

    done = sweep_zoo_rows(args.zoos, args.out, measure, domains=args.domains, workdir=args.workdir, n_clean=N_CLEAN)
    rows = list(done.values())
    y = np.array([r["is_backdoored"] for r in rows])
    attack = np.array([r["attack"] for r in rows])
    stats = {}
    for kind in ("logp", "rates"):
        stats[f"{kind}, mean over budgets"] = [robust_z(np.array(r[kind]).mean(1)).max() for r in rows]
        for b, budget in enumerate(BUDGETS):
            stats[f"{kind}, budget {budget}"] = [robust_z(np.array(r[kind])[:, b]).max() for r in rows]
    print(f"{len(rows)} models ({int(y.sum())} backdoored), {np.mean([r['seconds'] for r in rows]):.1f} s/model")
    for name, s in stats.items():
        s = np.asarray(s)
        line = f"{name}: all {auroc(s, y):.3f}"
        for a in sorted(set(attack) - {"none"}):
            m = (attack == a) | (attack == "none")
            line += f"; {a} {auroc(s[m], y[m]):.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
