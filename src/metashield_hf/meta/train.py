"""Meta-training with MAML under Accelerate: one visible loop.

prepare (cache, split, shard, detector) → per step: sample episodes → inner loop (deployable: clean support +
pseudo-anomalies) → outer loss on the query → backward → average gradients across processes (gather) → step → log →
checkpoint.

The same module runs on one CPU (``metashield train``) and under
``accelerate launch --multi_gpu --num_processes N -m metashield_hf.meta.train ...``; without CUDA the
``Accelerator`` is created with ``cpu=True``, which is what makes N CPU processes one gloo group
(``--cpu --num_processes 2`` silently runs one process). Tasks (zoo models) are sharded across processes; every process
starts from the same seeded weights and applies the same averaged meta-gradient, so the replicas stay identical.
The detector is not wrapped in DDP: the inner loop differentiates through ``torch.func.functional_call``, which DDP's
gradient hooks do not support, so the meta-gradient is averaged by hand with one all-reduce.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from torch.func import functional_call
from tqdm.auto import tqdm

from ..configuration_metashield import MetaShieldConfig
from ..features import feature_names, resolve_groups
from ..modeling_metashield import MetaShieldDetector
from ..probes import LiveEvidence
from .cache import TaskActivations, cache_path, load_tasks, read_meta
from .episodes import INNER_MODES, Episode, sample_episode
from .inner import inner_loop
from .runtime import CSVTracker, TrainProgress, latest_checkpoint, save_checkpoint, torch_threads, weights_sha256
from .split import split_models

logger = logging.getLogger(__name__)
ALGORITHMS = ("maml", "fomaml", "pooled")


@dataclass
class MetaTrainArguments:
    """Settings of one meta-training run (saved as ``train_args.json`` in ``--out``)."""

    out: str = field(metadata={"help": "Output folder: detector/, checkpoints/, split.json, log.csv, metrics.json."})
    zoo: str | None = field(default=None, metadata={"help": "Zoo folder or Hub id; its activations are cached first."})
    cache_dir: str | None = field(default=None, metadata={"help": "Activation cache folder (default: <out>/cache)."})
    algorithm: str = field(default="maml", metadata={"help": "maml (second order) | fomaml | pooled (no inner loop)."})
    inner_mode: str = field(default="deployable", metadata={"help": "deployable | oracle (ablation only)."})
    steps: int = field(default=300, metadata={"help": "Outer steps."})
    meta_batch: int = field(default=8, metadata={"help": "Episodes per outer step, over all processes."})
    inner_steps: int = field(default=3, metadata={"help": "Inner-loop gradient steps per episode."})
    inner_lr: float = field(default=0.05, metadata={"help": "Inner-loop learning rate."})
    outer_lr: float = field(default=3e-3, metadata={"help": "Adam learning rate of the outer loop."})
    k_choices: str = field(default="5,10,20,50", metadata={"help": "Support sizes to sample from (capped per model)."})
    n_query: int = field(default=32, metadata={"help": "Clean and triggered query inputs each, per episode."})
    groups: str | None = field(default=None, metadata={"help": "Comma-separated ψ feature groups (default: all)."})
    hidden_dim: int = field(default=64, metadata={"help": "Detector width."})
    probes: str = field(
        default="",
        metadata={
            "help": "Comma-separated live probes whose features follow ψ (metashield_hf.probes; empty: the one-pass "
            "detector). Their episodes come from a live bank (episode_source), not the activation cache."
        },
    )
    probe_passes: int = field(
        default=16, metadata={"help": "Budget of extra forward passes per input for the probes."}
    )
    test_fraction: float = field(default=0.3, metadata={"help": "Share of each (domain, attack) held out."})
    holdout_domain: str | None = field(default=None, metadata={"help": "Leave this domain out (e.g. nlp)."})
    holdout_attack: str | None = field(default=None, metadata={"help": "Leave this attack out (e.g. blend)."})
    split: str | None = field(
        default=None,
        metadata={
            "help": "A split.json ({'train': [...], 'test': [...]}) to reuse instead of drawing one: the same models "
            "whatever else is in the cache (overrides --test_fraction and --holdout_*)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seeds the weights, the split and every episode."})
    checkpoint_every: int = field(default=50, metadata={"help": "Save a resumable checkpoint every N steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept (older ones are deleted)."})
    num_threads: int = field(
        default=1,
        metadata={
            "help": "torch threads per process in the loop (its tensors are tiny: more threads mostly wait); 0: "
            "torch's default."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint in --out."})
    json: bool = field(default=False, metadata={"help": "Print the summary as JSON."})

    def __post_init__(self):
        if self.zoo is None and self.cache_dir is None:
            raise ValueError("give --zoo (a built zoo) or --cache_dir (its cached activations)")
        if self.cache_dir is None:
            self.cache_dir = str(Path(self.out) / "cache")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.inner_mode not in INNER_MODES:
            raise ValueError(f"inner_mode must be one of {INNER_MODES}, got {self.inner_mode!r}")
        if min(self.steps, self.meta_batch, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise ValueError("steps, meta_batch, checkpoint_every and keep_checkpoints must be >= 1")
        self.group_tuple  # noqa: B018  (validates --groups now, not after the cache is built)

    @property
    def group_tuple(self) -> tuple[str, ...]:
        return resolve_groups(self.groups.split(",") if self.groups else None)

    @property
    def k_tuple(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.k_choices.split(","))


@dataclass
class MetaTrainOutput:
    """Summary of a run (also written to ``<out>/metrics.json``).

    Attributes:
        detector_dir: the saved detector (``MetaShieldDetector.from_pretrained`` loads it).
        steps: outer steps done in total (including those before a resume).
        episodes: episodes processed by this run, over all processes.
        seconds: wall time of this run's training loop.
        episodes_per_s: meta-training throughput of this run (``episodes / seconds``).
        num_processes: processes that trained.
        final_loss: mean outer loss of the last step, over all processes.
        train_models, test_models: sizes of the split (``split.json`` lists them).
        weights_sha256: hash of the final weights on this process (equal on every process; identifies the detector).
    """

    detector_dir: str
    steps: int
    episodes: int
    seconds: float
    episodes_per_s: float
    num_processes: int
    final_loss: float
    train_models: int
    test_models: int
    weights_sha256: str


def new_detector(args: MetaTrainArguments) -> MetaShieldDetector:
    """A freshly initialised detector whose config records the ψ layout of ``args.groups`` and the live probes'."""
    groups = args.group_tuple
    probes = [p for p in args.probes.split(",") if p]
    live = LiveEvidence(probes, probe_passes=args.probe_passes).feature_names
    config = MetaShieldConfig(
        feature_names=feature_names(groups) + live, feature_groups=list(groups), hidden_dim=args.hidden_dim,
        probes=probes, probe_passes=args.probe_passes,
    )  # fmt: skip
    return MetaShieldDetector(config)


def episode_loss(detector: MetaShieldDetector, ep: Episode, args: MetaTrainArguments) -> torch.Tensor:
    """Outer loss of one episode: BCE on the query with the inner-loop-adapted parameters."""
    device = next(detector.parameters()).device
    support, anomalies = ep.support.to(device), ep.inner_anomalies.to(device)
    params = dict(detector.named_parameters())
    if args.algorithm != "pooled" and args.inner_steps > 0:
        params = inner_loop(
            detector,
            params,
            support,
            anomalies,
            support,
            steps=args.inner_steps,
            lr=args.inner_lr,
            create_graph=args.algorithm == "maml",  # fomaml: the adapted weights' gradient is taken as identity
        )
    inputs = (ep.query.to(device), support)
    return functional_call(detector, params, inputs, {"labels": ep.query_labels.to(device)}).loss


def prepare_tasks(args: MetaTrainArguments, acc: Accelerator) -> tuple[list[str], list[str], list[TaskActivations]]:
    """Cache the zoo's activations (each process its share of rows), split by model, load this process's shard.

    Returns:
        ``(train_ids, test_ids, tasks)`` where ``tasks`` are this process's training tasks.
    """
    if args.zoo is not None:
        from ..zoo import load_zoo
        from .cache import cache_activations

        zoo = load_zoo(args.zoo)
        rows = list(range(len(zoo)))[acc.process_index :: acc.num_processes]
        cache_activations(zoo, args.cache_dir, rows=rows, progress=acc.is_local_main_process)
        acc.wait_for_everyone()
        ids = zoo.select_columns(["model_id"])["model_id"]
    else:
        ids = sorted(p.stem for p in Path(args.cache_dir).glob("*.safetensors"))
    if not ids:
        raise ValueError(f"no zoo models found in {args.zoo or args.cache_dir}")
    if args.split is not None:  # a fixed split: models added to the cache later change nothing
        fixed = json.loads(Path(args.split).read_text())
        train_ids, test_ids = sorted(fixed["train"]), sorted(fixed.get("test", []))
        if not train_ids:
            raise ValueError(f"--split {args.split} lists no training models")
    else:
        train_ids, test_ids = split_models(
            [read_meta(cache_path(args.cache_dir, i)) for i in ids],
            test_fraction=args.test_fraction,
            seed=args.seed,
            holdout_domain=args.holdout_domain,
            holdout_attack=args.holdout_attack,
        )
    if len(train_ids) < acc.num_processes:
        raise ValueError(
            f"{len(train_ids)} training models cannot be sharded over {acc.num_processes} processes; "
            "use fewer processes or a larger zoo"
        )
    return train_ids, test_ids, load_tasks(args.cache_dir, train_ids[acc.process_index :: acc.num_processes])


def average_gradients(detector: torch.nn.Module, acc: Accelerator) -> None:
    """Replace each gradient by its mean over processes (one all-reduce of the flattened gradient)."""
    if acc.num_processes == 1:
        return
    params = list(detector.parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    flat = acc.reduce(flat, reduction="mean")
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).clone()


def train(
    args: MetaTrainArguments,
    accelerator: Accelerator | None = None,
    *,
    episode_source: Callable[[list[TaskActivations], random.Random], Episode] | None = None,
) -> MetaTrainOutput:
    """Meta-train a detector on the training split of the zoo.

    Args:
        args: the run's settings.
        accelerator: an existing `Accelerator` (e.g. from ``debug_launcher``); by default one is created with a CSV
            tracker writing ``<out>/log.csv``.
        episode_source: ``(tasks, rng) -> Episode`` drawing one episode of ``args.groups``' ψ layout from this
            process's training tasks, instead of computing it here (e.g. a precomputed bank shared by an ablation
            sweep, `metashield_hf.evaluation.training.EpisodeBank`); default: `sample_episode`.

    Returns:
        A [`MetaTrainOutput`]; the detector is saved to ``<out>/detector``.

    Example:
        ```python
        >>> out = train(MetaTrainArguments(out="runs/tiny", zoo="zoo_tiny", steps=100))
        >>> detector = MetaShieldDetector.from_pretrained(out.detector_dir)
        ```
    """
    if args.probes and episode_source is None:
        raise ValueError(
            f"--probes {args.probes}: the live probes' features come from live episodes (the model itself, not the "
            "activation cache); pass episode_source= built from metashield_hf.evaluation.live (as "
            "benchmarks/input_detection/live.py does), or train without --probes"
        )
    out = Path(args.out)
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), log_with=[CSVTracker("log", out)])

    # --- prepare: tasks, identical initial weights on every process, optimizer, checkpoint state
    train_ids, test_ids, tasks = prepare_tasks(args, acc)
    set_seed(args.seed)
    detector = new_detector(args).to(acc.device)
    for p in detector.parameters():  # identical by the seed already; the broadcast makes it independent of it
        p.data.copy_(broadcast(p.data.contiguous(), from_process=0))
    optimizer = torch.optim.Adam(detector.parameters(), lr=args.outer_lr)
    progress = TrainProgress()
    acc.register_for_checkpointing(detector, optimizer, progress)
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s/checkpoints, starting from scratch", out)
        else:
            acc.load_state(str(ckpt))
            logger.info("resumed from %s at step %d", ckpt, progress.step)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps({"train": train_ids, "test": test_ids}, indent=1))
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
    acc.init_trackers("metashield-train")

    per_process = max(1, args.meta_batch // acc.num_processes)
    episodes_done, loss_value = 0, float("nan")
    bar = tqdm(range(progress.step, args.steps), desc="meta-train", disable=not acc.is_local_main_process)
    with torch_threads(args.num_threads):
        t0 = time.perf_counter()
        for step in bar:
            detector.train()
            # Episodes depend only on (seed, step, process): a resumed run draws exactly what it would have drawn.
            rng = random.Random(f"{args.seed}-{step}-{acc.process_index}")
            episodes = [
                episode_source(tasks, rng)
                if episode_source is not None
                else sample_episode(
                    tasks,
                    rng,
                    k_choices=args.k_tuple,
                    groups=args.group_tuple,
                    n_query=args.n_query,
                    inner_mode=args.inner_mode,
                )
                for _ in range(per_process)
            ]
            # inner loop + outer loss
            loss = torch.stack([episode_loss(detector, ep, args) for ep in episodes]).mean()
            # backward → gather (identical averaged meta-gradient on every process) → step
            optimizer.zero_grad()
            loss.backward()
            average_gradients(detector, acc)
            torch.nn.utils.clip_grad_norm_(detector.parameters(), 5.0)
            optimizer.step()
            progress.step = step + 1
            episodes_done += per_process * acc.num_processes
            loss_value = acc.reduce(loss.detach(), reduction="mean").item()
            rate = episodes_done / (time.perf_counter() - t0)
            acc.log({"loss": loss_value, "episodes_per_s": rate}, step=progress.step)
            bar.set_postfix(loss=f"{loss_value:.4f}", eps=f"{rate:.1f}/s")
            # checkpoint
            if progress.step % args.checkpoint_every == 0 or progress.step == args.steps:
                save_checkpoint(acc, out, progress.step, args.keep_checkpoints)
        elapsed = time.perf_counter() - t0

    folder = out / "detector"
    result = MetaTrainOutput(
        detector_dir=str(folder),
        steps=progress.step,
        episodes=episodes_done,
        seconds=elapsed,
        episodes_per_s=episodes_done / max(elapsed, 1e-9),
        num_processes=acc.num_processes,
        final_loss=loss_value,
        train_models=len(train_ids),
        test_models=len(test_ids),
        weights_sha256=weights_sha256(detector),
    )
    if acc.is_main_process:
        # Deployment adapts the way meta-training adapted (pooled training has no inner loop).
        detector.config.adapt_steps = 0 if args.algorithm == "pooled" else args.inner_steps
        detector.config.adapt_lr = args.inner_lr
        detector.save_pretrained(folder)
        for code in folder.glob("*.py"):  # a local folder loads through the registered classes; save_for_hub adds code
            code.unlink()
        (out / "metrics.json").write_text(json.dumps(asdict(result), indent=2))
        logger.info(
            "meta-training: %d episodes in %.1f s (%.2f episodes/s, %d processes), final loss %.4f",
            result.episodes,
            result.seconds,
            result.episodes_per_s,
            result.num_processes,
            result.final_loss,
        )
    acc.wait_for_everyone()
    acc.end_training()
    return result


def run_train(args: MetaTrainArguments) -> dict | None:
    """The job behind ``metashield train``: :func:`train`, reported by the main process only (``None`` elsewhere)."""
    from accelerate import PartialState

    result = asdict(train(args))
    return result if PartialState().is_main_process else None  # under accelerate launch, one process reports


def print_train(result: dict) -> None:
    """Print the summary of a :func:`run_train` result."""
    print(f"detector saved to {result['detector_dir']}")
    print(
        f"  {result['steps']} steps, {result['episodes']} episodes in {result['seconds']:.1f} s "
        f"({result['episodes_per_s']:.2f} episodes/s on {result['num_processes']} process(es)); "
        f"final outer loss {result['final_loss']:.4f}"
    )
    print(f"  split: {result['train_models']} training / {result['test_models']} held-out models")


if __name__ == "__main__":  # accelerate launch --multi_gpu --num_processes 2 -m metashield_hf.meta.train --zoo ...
    import sys

    from ..arguments import run_command

    sys.exit(run_command("train", MetaTrainArguments, run_train, print_train, sys.argv[1:]))
