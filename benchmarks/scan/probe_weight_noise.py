"""Development probe (issue #32): does adversarial weight noise drive a backdoored model's clean samples to its target?

Adversarial neuron perturbation (ANP, Wu & Wang, NeurIPS 2021) and BAN (Xu et al., NeurIPS 2024) observe that a
backdoored network holds features that clean inputs leave quiet and that a small adversarial perturbation of the
weights switches on: under such noise the clean samples' predictions collapse onto the backdoor's target, whatever the
trigger's form, because the network already holds a short route to it. This probe measures that on zoo models, with
the scan's 20 clean samples and nothing else:

- ``untargeted``: multiplicative noise ``w * (1 + d)``, ``|d| <= eps`` on every floating weight, ascending the cross
  entropy of the model's own clean predictions (sign steps); the share of samples, not predicted ``c`` before, that
  the noisy model predicts ``c``; per budget ``eps``.
- ``targeted``: for each class ``c``, the same noise descending the cross entropy of ``c``; the share flipped to ``c``.

The statistic of each form is the largest robust z over classes of the share (mean over budgets), and its class.
Nothing here is in the library or the shipped scan: it measures whether the idea separates backdoored from clean
models before a source is built from it, on zoos that are development data.

    python benchmarks/scan/probe_weight_noise.py --zoos artifacts/zoo/unseen_cv_2 --out benchmarks/scan/results/probe_weight_noise.json
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc
from metashield_hf.zoo import load_zoo, row_probe, row_to_target

N_CLEAN, MAD = 20, 1.4826
BUDGETS = [0.002, 0.005, 0.01, 0.02]
FORMS = ["untargeted", "targeted"]


@dataclass
class ProbeArguments:
    zoos: list[str] = field(metadata={"help": "Zoo folders."})
    out: str = field(metadata={"help": "JSON file of per-model results (resumable)."})
    steps: int = field(default=10, metadata={"help": "Sign steps per budget."})
    domains: list[str] = field(default_factory=lambda: ["cv", "fl"], metadata={"help": "Domains to probe."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Only these datasets (empty: every one)."})
    workdir: str = field(default="artifacts/scan_work_probe", metadata={"help": "Where checkpoints are unpacked."})
    report_only: bool = field(default=False, metadata={"help": "Print the table from --out without probing."})


def noisy_shares(adapter, inputs, pred: torch.Tensor, k: int, target: int | None, steps: int) -> np.ndarray:
    """Per budget, the share of samples (not predicted the class before) the noisy model predicts each class ``(B, K)``.

    ``target=None`` ascends the loss of the clean predictions; a class descends the loss of that class."""
    params = [p for p in adapter.model.parameters() if p.is_floating_point()]
    originals = [p.detach().clone() for p in params]
    shares = np.zeros((len(BUDGETS), k))
    labels = pred if target is None else torch.full_like(pred, target)
    try:
        for b, eps in enumerate(BUDGETS):
            deltas = [torch.zeros_like(p) for p in params]
            for step in range(steps + 1):
                with torch.no_grad():
                    for p, w, d in zip(params, originals, deltas, strict=True):
                        p.copy_(w * (1 + d))
                with torch.enable_grad():
                    for p in params:
                        p.requires_grad_(True)
                        p.grad = None
                    logits = adapter.forward(inputs)
                    if step == steps:
                        break
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                sign = 1.0 if target is None else -1.0
                with torch.no_grad():
                    for g, w, d in zip(grads, originals, deltas, strict=True):
                        if g is not None:
                            d.add_(sign * (eps / 4) * (g * w).sign()).clamp_(-eps, eps)
            after = logits.detach().argmax(-1)
            for c in range(k):
                other = pred != c
                shares[b, c] = float(((after == c) & other).sum() / other.sum().clamp_min(1))
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals, strict=True):
                p.copy_(w)
                p.requires_grad_(False)
    return shares


def robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    return (values - med) / max(MAD * np.median(np.abs(values - med)), 1e-2)


def probe(adapter, items, steps: int) -> dict:
    inputs = adapter.preprocess(items)
    with torch.no_grad():
        pred = adapter.forward(inputs).argmax(-1)
    k = adapter.num_classes
    rec = {}
    untargeted = noisy_shares(adapter, inputs, pred, k, None, steps)
    targeted = np.stack([noisy_shares(adapter, inputs, pred, k, c, steps)[:, c] for c in range(k)], 1)
    for form, shares in (("untargeted", untargeted), ("targeted", targeted)):
        z = robust_z(shares.mean(0))
        rec[form] = {"shares": shares.tolist(), "z_max": float(z.max()), "top_class": int(z.argmax())}
    return rec


def report(done: dict) -> None:
    for zoo_name in dict.fromkeys(r["zoo"] for r in done.values()):
        rows = [r for r in done.values() if r["zoo"] == zoo_name]
        y = np.array([r["is_backdoored"] for r in rows])
        bd = [r for r in rows if r["is_backdoored"]]
        for form in FORMS:
            s = np.array([r[form]["z_max"] for r in rows])
            line = f"{zoo_name} {form}: {len(rows)} models ({y.sum()} bd), AUROC {auroc(s, y):.3f}"
            line += f", top = target {np.mean([r[form]['top_class'] == r['target_label'] for r in bd]):.2f}"
            for attack in sorted({r["attack"] for r in bd}):
                m = np.array([r["attack"] in (attack, "none") for r in rows])
                line += f"; {attack} {auroc(s[m], y[m]):.2f}"
            print(line)
        print(f"{zoo_name}: {np.mean([r['seconds'] for r in rows]):.1f} s/model")


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    if not args.report_only:
        for zoo_dir in args.zoos:
            zoo = load_zoo(zoo_dir)
            todo = [
                i
                for i in range(len(zoo))
                if zoo[i]["domain"] in args.domains
                and (not args.datasets or zoo[i]["dataset"] in args.datasets)
                and zoo[i]["model_id"] not in done
            ]
            for i in tqdm(todo, desc=Path(zoo_dir).name, file=sys.stdout, mininterval=10):
                row = zoo[i]
                t = time.perf_counter()
                adapter = row_to_target(row, args.workdir)
                rec = {
                    "zoo": Path(zoo_dir).name,
                    "attack": row["attack"],
                    "dataset": row["dataset"],
                    "architecture": row["architecture"],
                    "is_backdoored": bool(row["is_backdoored"]),
                    "target_label": row["target_label"],
                }
                rec |= probe(adapter, row_probe(row)[0][:N_CLEAN], args.steps)
                rec["seconds"] = time.perf_counter() - t
                done[row["model_id"]] = rec
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(done, indent=1))
                shutil.rmtree(Path(args.workdir) / row["model_id"], ignore_errors=True)
    report(done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
