"""Development probes (issue #32): can the model itself be driven to send every clean sample to the backdoor's target?

Two published ideas that reason about what the network holds rather than about an input pattern, each measured on zoo
models with the scan's 20 clean samples and nothing else (``--method``):

- ``weight_noise``: adversarial neuron perturbation (ANP, Wu & Wang, NeurIPS 2021; BAN, Xu et al., NeurIPS 2024)
  observe that under a small adversarial perturbation of the weights a backdoored network's clean predictions collapse
  onto the target, because it holds a short route to it. Multiplicative noise ``w * (1 + d)``, ``|d| <= eps`` on every
  floating weight, sign steps ascending the cross entropy of the model's own clean predictions (``untargeted``) or
  descending that of each class ``c`` (``targeted``); per budget, the share of samples (not predicted ``c`` before)
  the noisy model predicts ``c``.
- ``stimulation``: ABS (Liu et al., CCS 2019) observes that a backdoor, whatever its trigger (a patch or a
  feature-space filter), is carried by a few inner neurons that, once raised, elevate the target for every input. Each
  channel of the adapter's layer blocks has its whole map set to ``v`` times its largest absolute clean activation;
  per class, ``reach`` = mean over ``v`` of the largest share over channels sent there, ``ease`` = minus the log of the
  smallest ``v`` at which one channel sends 90% of the samples there.

Each form's model statistic is the largest robust z over classes, and its class. Nothing here is in the library or the
shipped scan: it measures whether an idea separates backdoored from clean models before a source is built from it, on
zoos that are development data.

    python benchmarks/scan/probe_drive.py --method weight_noise --zoos artifacts/zoo/unseen_cv_4 --datasets cifar10 \
        --out benchmarks/scan/results/probe_weight_noise.json
    python benchmarks/scan/probe_drive.py --method stimulation --zoos artifacts/zoo/unseen_cv_4 \
        --out benchmarks/scan/results/probe_stimulation.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from metashield_hf.evaluation.metrics import auroc
from metashield_hf.zoo import sweep_zoo_rows

N_CLEAN, MAD = 20, 1.4826
BUDGETS = [0.002, 0.005, 0.01, 0.02]  # weight noise
LEVELS = [1.5, 2.0, 3.0, 5.0, 8.0, 13.0]  # stimulation
HIT = 0.9


@dataclass
class ProbeArguments:
    method: str = field(metadata={"help": "weight_noise or stimulation."})
    zoos: list[str] = field(metadata={"help": "Zoo folders."})
    out: str = field(metadata={"help": "JSON file of per-model results (resumable)."})
    steps: int = field(default=10, metadata={"help": "weight_noise: sign steps per budget."})
    chunk: int = field(default=16, metadata={"help": "stimulation: channels stimulated per forward pass."})
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


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def channel_dim(x: torch.Tensor) -> int:
    return 1 if x.dim() == 4 else x.dim() - 1


def tile(inputs, times: int):
    if isinstance(inputs, torch.Tensor):
        return inputs.repeat(times, *([1] * (inputs.dim() - 1)))
    return {k: tile(v, times) for k, v in inputs.items()}


def clean_peaks(adapter, inputs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One clean forward pass: the predictions, and per layer block (by index) each channel's largest absolute
    activation over the samples."""
    blocks = adapter.layer_blocks()
    peaks = {}

    def record(i):
        def hook(_m, _a, out):
            x = first_tensor(out)
            if x is not None:
                d = channel_dim(x)
                dims = [j for j in range(x.dim()) if j != d]
                peaks[i] = x.detach().abs().amax(dim=dims)

        return hook

    handles = [m.register_forward_hook(record(i)) for i, (_, m) in enumerate(blocks)]
    try:
        with torch.no_grad():
            pred = adapter.forward(inputs).argmax(-1)
    finally:
        for h in handles:
            h.remove()
    return pred, peaks


def stimulate(
    adapter, inputs, pred: torch.Tensor, peaks: dict[int, torch.Tensor], k: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """``shares (L, K)``: per level, the largest share over channels sent to each class; ``first (K,)``: the smallest
    level at which some channel sends ``HIT`` of the samples to the class (``inf`` when none); ``pred`` and ``peaks``
    from [`clean_peaks`]."""
    n = len(pred)
    blocks = adapter.layer_blocks()
    shares = np.zeros((len(LEVELS), k))
    first = np.full(k, np.inf)
    other = (pred[None, :] != torch.arange(k)[:, None]).float()  # (K, N)
    for i, (_, module) in enumerate(blocks):
        if i not in peaks:
            continue
        peak = peaks[i]
        for start in range(0, len(peak), chunk):
            chans = list(range(start, min(start + chunk, len(peak))))
            batch = tile(inputs, len(chans))
            for li, level in enumerate(LEVELS):

                def hook(_m, _a, out, chans=chans, level=level, peak=peak):
                    x = first_tensor(out)
                    d = channel_dim(x)
                    x = x.clone()
                    for j, c in enumerate(chans):
                        idx = [slice(None)] * x.dim()
                        idx[0] = slice(j * n, (j + 1) * n)
                        idx[d] = c
                        x[tuple(idx)] = level * peak[c]
                    return x if isinstance(out, torch.Tensor) else (x, *out[1:])

                h = module.register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        after = adapter.forward(batch).argmax(-1).view(len(chans), n)
                finally:
                    h.remove()
                hit = (after[:, None, :] == torch.arange(k)[None, :, None]).float()  # (chans, K, N)
                share = ((hit * other[None]).sum(-1) / other.sum(-1).clamp_min(1)[None]).amax(0).numpy()
                shares[li] = np.maximum(shares[li], share)
                reached = share >= HIT
                first[reached] = np.minimum(first[reached], level)
    return shares, first


def robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    return (values - med) / max(MAD * np.median(np.abs(values - med)), 1e-2)


def probe_weight_noise(adapter, items, args) -> dict:
    inputs = adapter.preprocess(items)
    with torch.no_grad():
        pred = adapter.forward(inputs).argmax(-1)
    k = adapter.num_classes
    rec = {}
    untargeted = noisy_shares(adapter, inputs, pred, k, None, args.steps)
    targeted = np.stack([noisy_shares(adapter, inputs, pred, k, c, args.steps)[:, c] for c in range(k)], 1)
    for form, shares in (("untargeted", untargeted), ("targeted", targeted)):
        z = robust_z(shares.mean(0))
        rec[form] = {"shares": shares.tolist(), "z_max": float(z.max()), "top_class": int(z.argmax())}
    return rec


def probe_stimulation(adapter, items, args) -> dict:
    inputs = adapter.preprocess(items)
    pred, peaks = clean_peaks(adapter, inputs)
    shares, first = stimulate(adapter, inputs, pred, peaks, adapter.num_classes, args.chunk)
    ease = -np.log(np.where(np.isfinite(first), first, 2 * LEVELS[-1]))
    rec = {"shares": shares.tolist(), "first": [float(f) for f in first]}
    for form, values in (("reach", shares.mean(0)), ("ease", ease)):
        z = robust_z(values)
        rec[form] = {"z_max": float(z.max()), "top_class": int(z.argmax())}
    return rec


PROBES = {
    "weight_noise": (probe_weight_noise, ["untargeted", "targeted"]),
    "stimulation": (probe_stimulation, ["reach", "ease"]),
}


def report(done: dict, forms: list[str]) -> None:
    for zoo_name in dict.fromkeys(r["zoo"] for r in done.values()):
        rows = [r for r in done.values() if r["zoo"] == zoo_name]
        y = np.array([r["is_backdoored"] for r in rows])
        bd = [r for r in rows if r["is_backdoored"]]
        for form in forms:
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
    if args.method not in PROBES:
        raise SystemExit(f"--method must be one of {list(PROBES)}, got {args.method!r}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    if args.report_only:
        done = json.loads(out.read_text()) if out.exists() else {}
    else:
        done = sweep_zoo_rows(
            args.zoos, out, lambda adapter, inputs: PROBES[args.method][0](adapter, inputs, args),
            domains=args.domains, datasets=args.datasets, workdir=args.workdir, n_clean=N_CLEAN,
        )  # fmt: skip
    report(done, PROBES[args.method][1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
