"""Development probe (issue #32): does raising one inner neuron send every clean sample to the backdoor's target?

ABS (Liu et al., "ABS: Scanning Neural Networks for Back-doors by Artificial Brain Stimulation", CCS 2019) observes
that a backdoor, whatever its trigger (a patch or a feature-space filter), is carried by a few inner neurons that, once
raised, elevate the target label for every input; in a clean network one raised neuron rarely outweighs the input's
own evidence. This probe stimulates each channel of the adapter's layer blocks (its whole map set to ``v`` times the
channel's largest absolute activation over the 20 clean samples, for a few ``v``) and records, per class, the share of
samples (not predicted the class before) the stimulated model predicts the class, and the smallest ``v`` at which
some channel sends at least 90% of them there.

Statistics per class ``c``: ``reach_c`` = mean over ``v`` of the largest share over channels; ``ease_c`` = minus the
log of the smallest ``v`` sending 90% (or of twice the largest ``v`` when none does). Each form's model statistic is
the largest robust z over classes, and its class. Nothing here is in the library or the shipped scan: it measures
whether the idea separates backdoored from clean models before a source is built from it (development zoos).

    python benchmarks/scan/probe_stimulation.py --zoos artifacts/zoo/unseen_cv_2 --out benchmarks/scan/results/probe_stimulation.json
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
LEVELS = [1.5, 2.0, 3.0, 5.0, 8.0, 13.0]
FORMS = ["reach", "ease"]
HIT = 0.9


@dataclass
class ProbeArguments:
    zoos: list[str] = field(metadata={"help": "Zoo folders."})
    out: str = field(metadata={"help": "JSON file of per-model results (resumable)."})
    domains: list[str] = field(default_factory=lambda: ["cv", "fl"], metadata={"help": "Domains to probe."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Only these datasets (empty: every one)."})
    chunk: int = field(default=16, metadata={"help": "Channels stimulated per forward pass."})
    workdir: str = field(default="artifacts/scan_work_probe", metadata={"help": "Where checkpoints are unpacked."})
    report_only: bool = field(default=False, metadata={"help": "Print the table from --out without probing."})


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


def stimulate(adapter, inputs, pred: torch.Tensor, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``shares (L, K)``: per level, the largest share over channels sent to each class; ``first (K,)``: the smallest
    level at which some channel sends ``HIT`` of the samples to the class (``inf`` when none)."""
    n = len(pred)
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
            adapter.forward(inputs)
    finally:
        for h in handles:
            h.remove()
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


def probe(adapter, items, chunk: int) -> dict:
    inputs = adapter.preprocess(items)
    with torch.no_grad():
        pred = adapter.forward(inputs).argmax(-1)
    k = adapter.num_classes
    shares, first = stimulate(adapter, inputs, pred, k, chunk)
    ease = -np.log(np.where(np.isfinite(first), first, 2 * LEVELS[-1]))
    rec = {"shares": shares.tolist(), "first": [float(f) for f in first]}
    for form, values in (("reach", shares.mean(0)), ("ease", ease)):
        z = robust_z(values)
        rec[form] = {"z_max": float(z.max()), "top_class": int(z.argmax())}
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
                rec |= probe(adapter, row_probe(row)[0][:N_CLEAN], args.chunk)
                rec["seconds"] = time.perf_counter() - t
                done[row["model_id"]] = rec
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(done, indent=1))
                shutil.rmtree(Path(args.workdir) / row["model_id"], ignore_errors=True)
    report(done)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
