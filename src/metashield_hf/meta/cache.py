"""Per-model activation cache: each zoo model's probe set goes through its target adapter once.

One safetensors file per ``model_id`` holding clean/triggered penultimate activations and logits, the probe labels
and the classification head; metadata (domain, attack, ...) in the safetensors header. Episodes then cost
milliseconds. Rebuilding only computes what is missing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..targets.base import TargetOutput

logger = logging.getLogger(__name__)

META_KEYS = (
    "model_id",
    "domain",
    "dataset",
    "family",
    "architecture",
    "attack",
    "is_backdoored",
    "target_label",
    "poison_rate",
    "clean_accuracy",
    "attack_success_rate",
    "seed",
    "attack_params",  # JSON: e.g. the source classes of a source-specific (TaCT) trigger
)


@dataclass
class TaskActivations:
    """Everything meta-training and evaluation need from one zoo model."""

    meta: dict
    clean: TargetOutput
    triggered: TargetOutput
    labels: torch.Tensor  # (N,) true labels of the clean probe inputs
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def backdoored(self) -> bool:
        return bool(self.meta.get("is_backdoored", self.meta["attack"] != "none"))


def cache_path(cache_dir: str | Path, model_id: str) -> Path:
    """The cache file of one zoo model: ``<cache_dir>/<model_id>.safetensors``."""
    return Path(cache_dir) / f"{model_id}.safetensors"


def read_meta(path: str | Path) -> dict:
    """A cache file's metadata (domain, attack, ...) from its header only, without loading the tensors."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["meta"])


def cache_activations(
    zoo, cache_dir: str | Path, *, progress: bool = True, rows: list[int] | None = None
) -> list[Path]:
    """Compute and store activations for every zoo row not cached yet.

    Args:
        zoo: the zoo `datasets.Dataset` (see `metashield_hf.zoo.load_zoo`).
        cache_dir: folder of ``<model_id>.safetensors`` files.
        progress: show a tqdm bar.
        rows: only these row indices (e.g. this process's shard).

    Returns:
        The cache files of the requested rows (existing files are kept as they are: a ``model_id`` names one trained
        checkpoint, so its activations never change).

    Example:
        ```python
        >>> paths = cache_activations(load_zoo("zoo_tiny"), "cache")   # a second call computes nothing
        >>> task = load_task(paths[0])
        ```
    """
    from ..zoo import row_probe, row_to_target

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(zoo))) if rows is None else rows
    ids = zoo.select_columns(["model_id"])["model_id"]
    paths = []
    for i in tqdm(indices, desc="activation cache", disable=not progress):
        path = cache_path(cache_dir, ids[i])
        paths.append(path)
        if path.exists():
            continue
        row = zoo[i]
        with tempfile.TemporaryDirectory() as work:
            adapter = row_to_target(row, work)
            clean, triggered, labels = row_probe(row)
            out_c, out_t = adapter(clean), adapter(triggered)
            head = adapter.head
            tensors = {
                "clean_penultimate": out_c.penultimate,
                "clean_logits": out_c.logits,
                "triggered_penultimate": out_t.penultimate,
                "triggered_logits": out_t.logits,
                "labels": torch.as_tensor(labels, dtype=torch.long),
                "head_weight": head.weight.detach().float().contiguous(),
            }
            if head.bias is not None:
                tensors["head_bias"] = head.bias.detach().float().contiguous()
        meta = {k: row[k] for k in META_KEYS if k in row}
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"meta": json.dumps(meta)})
        tmp.rename(path)  # atomic: a crash never leaves a half-written cache entry
    return paths


def load_task(path: str | Path) -> TaskActivations:
    """One cached task."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    return TaskActivations(
        meta=meta,
        clean=TargetOutput(t["clean_logits"], t["clean_penultimate"]),
        triggered=TargetOutput(t["triggered_logits"], t["triggered_penultimate"]),
        labels=t["labels"],
        head_weight=t["head_weight"],
        head_bias=t.get("head_bias"),
    )


def load_tasks(cache_dir: str | Path, model_ids: list[str] | None = None) -> list[TaskActivations]:
    """Load cached tasks (all, or the given ids in that order)."""
    cache_dir = Path(cache_dir)
    if model_ids is None:
        return [load_task(p) for p in sorted(cache_dir.glob("*.safetensors"))]
    missing = [m for m in model_ids if not cache_path(cache_dir, m).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} models are not in the cache {cache_dir}: {missing[:3]}...")
    return [load_task(cache_path(cache_dir, m)) for m in model_ids]
