"""Activations of augmented copies of every zoo model's clean probe inputs, for the calibration study.

`adapt(..., calibration_copies=m)` calibrates the threshold on the leave-one-out clean scores and on ``m`` mild,
label-preserving copies of each clean sample (`TargetAdapter.perturb(..., "augment")`). The calibration study scores
cached activations, so this script runs each zoo model once more on ``--copies`` augmented copies of each clean probe
input (`metashield_hf.shield.augmented_outputs`, the function `adapt` calls) and stores them beside the activation
cache, one ``<model_id>.safetensors`` per model (``penultimate``, ``logits``, ``origin``: the probe index of each
copy). It also builds the activation cache itself when it is missing. Resumable: finished models are skipped.

    python benchmarks/calibration/augmented_cache.py --zoo artifacts/zoo/live_dev \
        --cache artifacts/live/dev/cache --out artifacts/live/dev/augmented
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from metashield_hf.meta.cache import cache_activations
from metashield_hf.shield import augmented_outputs
from metashield_hf.zoo import load_zoo, row_probe, row_to_target


@dataclass
class AugmentedCacheArguments:
    zoo: str = field(metadata={"help": "A built zoo folder (or Hub id)."})
    cache: str = field(metadata={"help": "The activation cache folder (built here when missing)."})
    out: str = field(metadata={"help": "Folder of the augmented copies' activations."})
    copies: int = field(default=4, metadata={"help": "Augmented copies per clean probe input."})
    seed: int = field(default=0, metadata={"help": "Seeds the augmentations."})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(AugmentedCacheArguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    zoo = load_zoo(args.zoo)
    cache_activations(zoo, args.cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = zoo.select_columns(["model_id"])["model_id"]
    for i in tqdm(range(len(zoo)), desc="augmented copies"):
        path = out / f"{ids[i]}.safetensors"
        if path.exists():
            continue
        row = zoo[i]
        with tempfile.TemporaryDirectory() as work:
            adapter = row_to_target(row, work)
            clean, _, _ = row_probe(row)
            with torch.no_grad():
                res, origin = augmented_outputs(adapter, clean, args.copies, seed=args.seed)
        tensors = {"penultimate": res.penultimate.contiguous(), "logits": res.logits.contiguous(), "origin": origin}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"meta": json.dumps({"copies": args.copies, "seed": args.seed})})
        tmp.rename(path)


if __name__ == "__main__":
    main()
