"""``metashield zoo build`` / ``metashield zoo push``: argument dataclasses and the jobs behind them.

Sharded over processes with Accelerate; on CPUs use ``--multi_gpu`` (``--cpu --num_processes N`` silently runs
one process)::

    metashield zoo build --config configs/zoo/standard.yaml --out zoo_standard
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m metashield_hf.cli zoo build --config configs/zoo/standard.yaml --out zoo_standard
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ZooBuildArguments:
    """Flags of ``metashield zoo build``."""

    config: str = field(metadata={"help": "Zoo config YAML (e.g. configs/zoo/tiny.yaml)."})
    out: str = field(metadata={"help": "Build folder; re-running resumes (built and rejected models are skipped)."})
    data_dir: str | None = field(default=None, metadata={"help": "Shared data folder (overrides the config's)."})
    finalize: bool = field(default=True, metadata={"help": "Merge the parts into the dataset after building."})
    report: str | None = field(
        default=None, metadata={"help": "Also write the build report here (always also in --out)."}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch threads per process (default: 1 when sharded, else torch's)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on the main process."})


def run_zoo_build(args: ZooBuildArguments) -> dict[str, Any]:
    """The job behind ``metashield zoo build``: every process builds its shard, the main process finalizes.

    Returns:
        A summary dict (this process's build report, and on the main process the finalized counts).
    """
    import os
    import time

    import torch

    from .build import build_zoo, finalize_zoo
    from .spec import ZooConfig

    config = ZooConfig.from_yaml(args.config)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    # Shard from the launcher's environment (RANK / WORLD_SIZE, set by `accelerate launch` and torchrun) and do NOT
    # start a torch.distributed group: with one initialized, transformers' save_pretrained writes only on rank 0,
    # so every transformers model of the other ranks came out as an empty folder.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    threads = args.threads or (1 if world > 1 else None)
    if threads:
        torch.set_num_threads(threads)
    report = build_zoo(config, args.out, process_index=rank, num_processes=world, progress=args.progress)
    logger.info(
        "process %d/%d: built %d, skipped %d, rejected %d, failed %d in %.0f s",
        rank,
        world,
        len(report.built),
        len(report.skipped),
        len(report.rejected),
        len(report.failed),
        report.wall_seconds,
    )
    summary: dict[str, Any] = {
        "out": str(Path(args.out)),
        "process_index": rank,
        "num_processes": world,
        "planned": report.planned,
        "built": len(report.built),
        "skipped": len(report.skipped),
        "rejected": report.rejected,
        "failed": report.failed,
        "wall_seconds": round(report.wall_seconds, 1),
    }
    # A file barrier instead of a process group: the processes of one launch share the launcher as parent.
    done = Path(args.out) / "logs" / f".done-{os.getppid() if world > 1 else os.getpid()}"
    done.mkdir(parents=True, exist_ok=True)
    (done / str(rank)).touch()
    if args.finalize and rank == 0:
        while len(list(done.iterdir())) < world:
            time.sleep(2)
        ds = finalize_zoo(args.out, report_path=args.report)
        summary["accepted"] = len(ds)
        summary["report"] = args.report
    return summary


def print_zoo_build(result: dict[str, Any]) -> None:
    """Human-readable summary of :func:`run_zoo_build` (what the CLI prints)."""
    print(
        f"zoo build -> {result['out']}: planned {result['planned']}, built {result['built']}, skipped "
        f"{result['skipped']}, rejected {len(result['rejected'])}, failed {len(result['failed'])} "
        f"({result['wall_seconds']} s, process {result['process_index']}/{result['num_processes']})"
    )
    if "accepted" in result:
        print(f"finalized: {result['accepted']} accepted models; report: {result['report']}")


@dataclass
class ZooPushArguments:
    """Flags of ``metashield zoo push``."""

    out: str = field(metadata={"help": "A finalized build folder."})
    repo_id: str = field(metadata={"help": "Hub dataset repo, e.g. my-org/metashield-zoo."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})


def run_zoo_push(args: ZooPushArguments) -> dict[str, Any]:
    """Upload a finalized zoo (``data/``, ``metadata/``, ``README.md``) to a Hub dataset repo."""
    from huggingface_hub import HfApi

    out = Path(args.out)
    if not (out / "README.md").exists() or not any((out / "data").glob("train-*.parquet")):
        raise ValueError(f"{out} is not a finalized zoo (no README.md / data/train-*.parquet); run zoo build first")
    api = HfApi(token=args.token)
    api.create_repo(args.repo_id, repo_type="dataset", private=args.private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(out),
        repo_id=args.repo_id,
        repo_type="dataset",
        allow_patterns=["data/*", "metadata/*", "README.md"],
        commit_message="Upload MetaShield model zoo",
    )
    return {"repo_id": args.repo_id, "commit": str(info)}
