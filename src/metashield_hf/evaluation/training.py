"""Detectors trained by the evaluation protocols: one episode bank shared by every run of a sweep.

A protocol that retrains (leave one domain / attack / architecture out, drop one ψ feature group) calls the ordinary
meta-training loop, `metashield_hf.meta.train.train`, with a fixed split and a reduced step count. The episodes come
from an [`EpisodeBank`]: ψ is computed once per (model, episode) with every feature group, and a run that drops a
group takes the other groups' columns. That is exact, not an approximation: each group draws its perturbations from
its own generator (`features.group_seed`), so ψ of a subset of groups *is* the subset of ψ's columns. It also makes
the ablation controlled: every variant trains on exactly the same episodes, minus the columns it is denied. The cost:
the bank holds ``size`` episodes per model, so a long run revisits them (300 steps × 8 episodes over ~100 models × 8
banked episodes: each about 3 times).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..features import DEFAULT_GROUPS, feature_names, resolve_groups
from ..meta.cache import TaskActivations
from ..meta.episodes import Episode, make_episode

logger = logging.getLogger(__name__)


def group_columns(groups: Sequence[str] | None) -> torch.Tensor:
    """Column indices of ``groups``' features in the full ψ layout (all [`DEFAULT_GROUPS`], in order)."""
    keep = set(resolve_groups(groups))
    return torch.tensor([j for j, n in enumerate(feature_names(DEFAULT_GROUPS)) if n.split(".", 1)[0] in keep])


def select_groups(ep: Episode, groups: Sequence[str] | None) -> Episode:
    """The episode with only ``groups``' ψ columns (an episode of all groups is returned as it is)."""
    if groups is None or tuple(groups) == DEFAULT_GROUPS:
        return ep
    cols = group_columns(groups)
    return replace(
        ep, support=ep.support[:, cols], inner_anomalies=ep.inner_anomalies[:, cols], query=ep.query[:, cols]
    )


class EpisodeBank:
    """Deployable training episodes per model, drawn once (all feature groups) and shared by many training runs.

    Args:
        tasks: ``model_id -> TaskActivations`` lookup (a dict or any callable-backed mapping).
        size: episodes per model.
        k_choices: support sizes to draw from (as in meta-training).
        n_query: clean and triggered query inputs each.
        seed: seeds every draw; episode ``i`` of a model depends only on ``(seed, model_id, i)``.

    Example:
        ```python
        >>> bank = EpisodeBank(tasks, size=8)
        >>> out = train(MetaTrainArguments(..., groups="moments,distances"), episode_source=bank.source(["moments", "distances"]))
        ```
    """

    def __init__(
        self,
        tasks: Callable[[str], TaskActivations],
        *,
        size: int = 8,
        k_choices: Sequence[int] = (5, 10, 20),
        n_query: int = 32,
        seed: int = 0,
    ):
        if size < 1:
            raise ValueError(f"bank size must be >= 1, got {size}")
        self.tasks, self.size, self.k_choices, self.n_query, self.seed = tasks, size, tuple(k_choices), n_query, seed
        self.episodes: dict[str, list[Episode]] = {}
        self.seconds = 0.0

    def build(self, model_ids: Sequence[str]) -> None:
        """Draw the episodes of every model not banked yet (costs ψ of ``size`` episodes per model)."""
        t0 = time.perf_counter()
        for mid in model_ids:
            if mid in self.episodes:
                continue
            task = self.tasks(mid)
            rng = random.Random(f"bank-{self.seed}-{mid}")
            self.episodes[mid] = [
                make_episode(task, rng.choice(self.k_choices), seed=rng.randrange(2**31), n_query=self.n_query)
                for _ in range(self.size)
            ]
        self.seconds += time.perf_counter() - t0

    def source(self, groups: Sequence[str] | None = None) -> Callable[[list[TaskActivations], random.Random], Episode]:
        """``(tasks, rng) -> Episode`` for `meta.train.train`: a banked episode of a random training task."""
        groups = resolve_groups(groups)

        def draw(tasks: list[TaskActivations], rng: random.Random) -> Episode:
            task = rng.choice(tasks)
            self.build([task.model_id])
            return select_groups(rng.choice(self.episodes[task.model_id]), groups)

        return draw


def train_on_bank(
    out: str | Path,
    train_ids: Sequence[str],
    bank: EpisodeBank,
    *,
    cache_dir: str | Path,
    groups: Sequence[str] | None = None,
    steps: int = 150,
    meta_batch: int = 8,
    inner_steps: int = 3,
    seed: int = 0,
) -> tuple[Path, dict]:
    """Meta-train (second-order MAML, deployable inner loop) on exactly ``train_ids``, reusing a finished run.

    Args:
        out: the run's folder (``detector/``, ``metrics.json``, ``split.json`` as `metashield train` writes them).
        train_ids: the training models (written to ``<out>/fixed_split.json`` and passed as ``--split``).
        bank: where the episodes come from.
        cache_dir: the activation cache.
        groups: ψ feature groups (default all).
        steps, meta_batch, inner_steps, seed: as in `MetaTrainArguments`.

    Returns:
        ``(detector_dir, metrics)``; a folder whose ``train_args.json`` already matches is not trained again.
    """
    from ..meta.train import MetaTrainArguments, train

    out = Path(out)
    groups = resolve_groups(groups)
    args = MetaTrainArguments(
        out=str(out),
        cache_dir=str(cache_dir),
        split=str(out / "fixed_split.json"),
        steps=steps,
        meta_batch=meta_batch,
        inner_steps=inner_steps,
        k_choices=",".join(map(str, bank.k_choices)),
        n_query=bank.n_query,
        groups=None if groups == DEFAULT_GROUPS else ",".join(groups),
        seed=seed,
        checkpoint_every=steps,
        keep_checkpoints=1,
    )
    wanted = {**asdict(args), "train_ids": sorted(train_ids), "bank": [bank.size, bank.seed]}
    done = out / "eval_train.json"
    if done.exists() and json.loads(done.read_text()) == wanted and (out / "detector" / "config.json").exists():
        return out / "detector", json.loads((out / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "fixed_split.json").write_text(json.dumps({"train": sorted(train_ids), "test": []}, indent=1))
    bank.build(train_ids)  # outside the timed loop: episodes/s then measures the meta-update alone
    result = train(args, episode_source=bank.source(groups))
    done.write_text(json.dumps(wanted, indent=1))
    return Path(result.detector_dir), asdict(result)
