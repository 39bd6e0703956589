"""Meta-training with MAML under Accelerate (DESIGN §2.4): one visible loop.

prepare → sample episodes → inner loop (deployable: clean support + pseudo-anomalies) → outer loss on the query →
backward → average gradients across processes → step → log → checkpoint.

The same module runs on one CPU (``metashield train``) and under ``accelerate launch --multi_gpu --num_processes N``
(CPU processes need ``Accelerator(cpu=True)``, which ``--cpu`` sets; HF-NOTES gotcha 16). Tasks are sharded by model
across processes; every process starts from the same seeded weights and applies the same averaged gradient, so the
weights stay identical.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from torch.func import functional_call
from tqdm.auto import tqdm

from ..configuration_metashield import MetaShieldConfig
from ..features import feature_names, resolve_groups
from ..modeling_metashield import MetaShieldDetector
from .cache import load_tasks
from .episodes import K_CHOICES, Episode, make_episode
from .inner import inner_loop
from .split import split_models

logger = logging.getLogger(__name__)
ALGORITHMS = ("maml", "fomaml", "pooled")


@dataclass
class MetaTrainArguments:
    """Settings of one meta-training run (saved as ``train_args.json`` beside the detector)."""

    out: str = field(metadata={"help": "Output folder: detector/, checkpoints/, split.json, log.csv."})
    zoo: str | None = field(default=None, metadata={"help": "Zoo folder or Hub id; its activations are cached first."})
    cache_dir: str | None = field(default=None, metadata={"help": "Activation cache folder (default: <out>/cache)."})
    algorithm: str = field(
        default="maml", metadata={"help": "maml (second order) | fomaml | pooled (no meta-learning)."}
    )
    inner_mode: str = field(default="deployable", metadata={"help": "deployable | oracle (ablation only)."})
    steps: int = field(default=300, metadata={"help": "Outer steps."})
    meta_batch: int = field(default=8, metadata={"help": "Episodes per outer step (over all processes)."})
    inner_steps: int = field(default=3)
    inner_lr: float = field(default=0.05)
    outer_lr: float = field(default=3e-3)
    k_choices: str = field(default="5,10,20,50", metadata={"help": "Support sizes to sample from."})
    n_query: int = field(default=32)
    groups: str | None = field(default=None, metadata={"help": "Comma-separated feature groups (default: all)."})
    hidden_dim: int = field(default=64)
    test_fraction: float = field(default=0.3)
    holdout_domain: str | None = field(default=None)
    holdout_attack: str | None = field(default=None)
    seed: int = field(default=0)
    checkpoint_every: int = field(default=50)
    resume: bool = field(default=False)

    def __post_init__(self):
        if self.zoo is None and self.cache_dir is None:
            raise ValueError("give --zoo (a built zoo) or --cache_dir (its cached activations)")
        if self.cache_dir is None:
            self.cache_dir = str(Path(self.out) / "cache")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.inner_mode not in ("deployable", "oracle"):
            raise ValueError(f"inner_mode must be 'deployable' or 'oracle', got {self.inner_mode!r}")

    @property
    def group_tuple(self) -> tuple[str, ...]:
        return resolve_groups(self.groups.split(",") if self.groups else None)


class CSVTracker(GeneralTracker):
    """A dependency-free Accelerate tracker: one CSV row per logged step."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / f"{run_name}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        (self.path.parent / "train_config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        row = {"step": step, **values}
        new = not self.path.exists()
        if self._fields is None:
            self._fields = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def episode_loss(detector: MetaShieldDetector, ep: Episode, args: MetaTrainArguments) -> torch.Tensor:
    """Outer loss of one episode: BCE on the query with the inner-loop-adapted parameters."""
    params = dict(detector.named_parameters())
    if args.algorithm != "pooled" and args.inner_steps > 0:
        params = inner_loop(
            detector,
            params,
            ep.support,
            ep.inner_anomalies,
            ep.support,
            steps=args.inner_steps,
            lr=args.inner_lr,
            create_graph=args.algorithm == "maml",
        )
    return functional_call(detector, params, (ep.query, ep.support), {"labels": ep.query_labels}).loss


def new_detector(args: MetaTrainArguments) -> MetaShieldDetector:
    groups = args.group_tuple
    config = MetaShieldConfig(
        feature_names=feature_names(groups), feature_groups=list(groups), hidden_dim=args.hidden_dim
    )
    return MetaShieldDetector(config)


def train(args: MetaTrainArguments, accelerator: Accelerator | None = None) -> Path:
    """Meta-train a detector on the cached zoo tasks of the training split; returns the saved detector folder."""
    out = Path(args.out)
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), log_with=[CSVTracker("log", out)])
    set_seed(args.seed)  # identical initial weights on every process
    detector = new_detector(args)
    optimizer = torch.optim.Adam(detector.parameters(), lr=args.outer_lr)
    acc.register_for_checkpointing(detector, optimizer)

    if args.zoo is not None:  # each process caches its shard of the zoo, then everyone reads the whole cache
        from ..zoo import load_zoo
        from .cache import cache_activations

        zoo = load_zoo(args.zoo)
        cache_activations(
            zoo,
            args.cache_dir,
            rows=list(range(len(zoo)))[acc.process_index :: acc.num_processes],
            progress=acc.is_local_main_process,
        )
        acc.wait_for_everyone()
    all_tasks_meta = [t.meta for t in load_tasks(args.cache_dir)]
    train_ids, test_ids = split_models(
        all_tasks_meta,
        test_fraction=args.test_fraction,
        seed=args.seed,
        holdout_domain=args.holdout_domain,
        holdout_attack=args.holdout_attack,
    )
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps({"train": train_ids, "test": test_ids}, indent=1))
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
    shard = train_ids[acc.process_index :: acc.num_processes]
    tasks = load_tasks(args.cache_dir, shard)
    acc.init_trackers("metashield-train", config=asdict(args))

    start_step = 0
    ckpt = out / "checkpoints"
    if args.resume and (ckpt / "step.json").exists():
        acc.load_state(str(ckpt))
        start_step = json.loads((ckpt / "step.json").read_text())["step"]
        logger.info("resumed from %s at step %d", ckpt, start_step)

    k_choices = [int(k) for k in args.k_choices.split(",")] or list(K_CHOICES)
    per_process = max(1, args.meta_batch // acc.num_processes)
    bar = tqdm(range(start_step, args.steps), desc="meta-train", disable=not acc.is_local_main_process)
    t0, episodes_done = time.perf_counter(), 0
    for step in bar:
        detector.train()
        rng = random.Random(args.seed * 1_000_003 + step * 1_009 + acc.process_index)
        episodes = [
            make_episode(
                rng.choice(tasks),
                rng.choice(k_choices),
                seed=rng.randrange(2**31),
                groups=args.group_tuple,
                n_query=args.n_query,
                inner_mode=args.inner_mode,
            )
            for _ in range(per_process)
        ]
        loss = torch.stack([episode_loss(detector, ep, args) for ep in episodes]).mean()
        optimizer.zero_grad()
        loss.backward()
        if acc.num_processes > 1:  # average the meta-gradient: identical updates keep the replicas identical
            for p in detector.parameters():
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 5.0)
        optimizer.step()
        episodes_done += per_process * acc.num_processes
        mean_loss = acc.reduce(loss.detach(), reduction="mean").item()
        acc.log({"loss": mean_loss, "episodes_per_s": episodes_done / (time.perf_counter() - t0)}, step=step)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            acc.save_state(str(ckpt))
            if acc.is_main_process:
                (ckpt / "step.json").write_text(json.dumps({"step": step + 1}))
    acc.wait_for_everyone()
    elapsed = time.perf_counter() - t0
    folder = out / "detector"
    if acc.is_main_process:
        detector.save_pretrained(folder)
        for code in folder.glob("*.py"):
            code.unlink()
        stats = {
            "episodes": episodes_done,
            "seconds": elapsed,
            "episodes_per_s": episodes_done / max(elapsed, 1e-9),
            "num_processes": acc.num_processes,
        }
        (out / "throughput.json").write_text(json.dumps(stats, indent=2))
        logger.info(
            "meta-training: %d episodes in %.1f s (%.2f/s, %d processes)",
            episodes_done,
            elapsed,
            stats["episodes_per_s"],
            acc.num_processes,
        )
    acc.end_training()
    return folder


if __name__ == "__main__":  # accelerate launch -m metashield_hf.meta.train --cache_dir ... --out ...
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO)
    (parsed,) = HfArgumentParser(MetaTrainArguments).parse_args_into_dataclasses()
    train(parsed)
