"""Build, finalize and load the zoo (a Hugging Face dataset of poisoned and clean classifiers).

Layout of a build folder ``out_dir``::

    plan.json                       the config and every planned spec (written by process 0)
    parts/<model_id>.parquet        one accepted model = one row, written the moment it is built (resume skips it)
    rejected/<model_id>.json        a model that missed a floor, with the reason and its metrics (resume skips it)
    failed/<model_id>.json          a build that raised (resume retries it)
    logs/process-<i>.jsonl          one metadata line per model built by process i
    data/train-0000k-of-0000n.parquet, metadata/train.parquet, README.md, zoo_report.md   written by finalize_zoo()

Sharding: process ``i`` of ``n`` builds ``specs[i::n]``; parts of all processes merge in :func:`finalize_zoo`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .schema import FEATURES, HEAVY_COLUMNS, METADATA_FEATURES, entry_to_row, write_checkpoint
from .spec import ModelSpec, ZooConfig, ZooEntry, plan

logger = logging.getLogger(__name__)

__all__ = [
    "BuildReport",
    "ZooConfig",
    "build_zoo",
    "finalize_zoo",
    "load_zoo",
    "plan",
    "resolve_data_root",
    "row_to_target",
]

MAX_SHARD_BYTES = 500 * 2**20
ROW_GROUP_SIZE = 16  # rows per parquet row group: reading one model does not read the whole file


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``$METASHIELD_DATA`` if set, else ``data_dir``, else ``../shared/data`` beside the repo."""
    env = os.environ.get("METASHIELD_DATA")
    if env:
        return Path(env)
    if data_dir:
        return Path(data_dir)
    repo = Path(__file__).resolve().parents[3]
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "data"


def _builder(domain: str) -> Callable[[ModelSpec, Path, Path], ZooEntry]:
    if domain == "cv":
        from .vision import build_cv_entry

        return build_cv_entry
    if domain == "nlp":
        from .text import build_nlp_entry

        return build_nlp_entry
    if domain == "fl":
        from .fl import build_fl_entry

        return build_fl_entry
    raise ValueError(f"unknown domain {domain!r}; use 'cv', 'nlp' or 'fl'")


@dataclass
class BuildReport:
    """What one :func:`build_zoo` call did (this process's shard only).

    Attributes:
        planned: specs in the whole plan. assigned: specs in this shard.
        built: ids accepted and written now. skipped: ids already done (part or reject exists).
        rejected: id -> reason for models that missed the ASR floor now. failed: id -> error for builds that raised.
        seconds: id -> build seconds for the models built now. wall_seconds: the whole call.
    """

    planned: int = 0
    assigned: int = 0
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a crash never leaves a half-written file that resume would trust


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in METADATA_FEATURES}


def build_zoo(
    config: ZooConfig,
    out_dir: str | os.PathLike,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> BuildReport:
    """Build this process's shard of the zoo; resumable (built and rejected models are skipped).

    Args:
        config: the zoo config; :func:`plan` expands it.
        out_dir: the build folder (see the module docstring).
        process_index: this process's index; it builds ``specs[process_index::num_processes]``.
        num_processes: number of processes building the same plan.
        progress: show a tqdm bar (main process only).

    Returns:
        A :class:`BuildReport` for this shard. Call :func:`finalize_zoo` once all shards are done.

    Example:
        ```python
        config = ZooConfig.from_yaml("configs/zoo/tiny.yaml")
        report = build_zoo(config, "zoo_tiny")
        zoo = finalize_zoo("zoo_tiny")
        ```
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} must be in [0, {num_processes})")
    start = time.perf_counter()
    out = Path(out_dir)
    dirs = {name: out / name for name in ("parts", "rejected", "failed", "logs", "work")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    specs = plan(config)
    if process_index == 0:
        _write_json(out / "plan.json", {"config": config.to_dict(), "specs": [s.to_dict() for s in specs]})
    data_root = resolve_data_root(config.data_dir)
    mine = specs[process_index::num_processes]
    report = BuildReport(planned=len(specs), assigned=len(mine))
    log_path = dirs["logs"] / f"process-{process_index}.jsonl"
    bar = tqdm(mine, desc=f"zoo {config.name}", unit="model", disable=not progress or process_index != 0)
    for spec in bar:
        mid = spec.model_id
        part = dirs["parts"] / f"{mid}.parquet"
        if part.exists() or (dirs["rejected"] / f"{mid}.json").exists():
            report.skipped.append(mid)
            continue
        (dirs["failed"] / f"{mid}.json").unlink(missing_ok=True)
        try:
            entry = _builder(spec.domain)(spec, data_root, dirs["work"])
            row = entry_to_row(entry)
        except Exception as e:  # one bad model must not stop a long build; it is recorded and retried on resume
            logger.exception("zoo model %s failed", mid)
            report.failed[mid] = f"{type(e).__name__}: {e}"
            _write_json(
                dirs["failed"] / f"{mid}.json", {"model_id": mid, "error": report.failed[mid], "spec": spec.to_dict()}
            )
            continue
        report.seconds[mid] = entry.train_seconds
        meta = _metadata(row)
        if spec.is_backdoored and entry.attack_success_rate < config.asr_min:
            reason = f"attack success rate {entry.attack_success_rate:.3f} < floor {config.asr_min}"
            report.rejected[mid] = reason
            _write_json(dirs["rejected"] / f"{mid}.json", {"stage": "asr_floor", "reason": reason, **meta})
        else:
            tmp = part.with_name(f".{part.name}.{os.getpid()}.tmp")
            Dataset.from_list([row], features=FEATURES).to_parquet(str(tmp), batch_size=ROW_GROUP_SIZE)
            tmp.replace(part)
            report.built.append(mid)
        with open(log_path, "a") as f:
            f.write(json.dumps({**meta, "rejected": report.rejected.get(mid)}, sort_keys=True) + "\n")
        shutil.rmtree(dirs["work"] / mid, ignore_errors=True)  # the part holds the files now
        logger.info(
            "zoo %s: clean acc %.3f, ASR %.3f, %.1f s%s",
            mid,
            entry.clean_accuracy,
            entry.attack_success_rate,
            entry.train_seconds,
            f" (REJECTED: {report.rejected[mid]})" if mid in report.rejected else "",
        )
        bar.set_postfix(built=len(report.built), rejected=len(report.rejected), failed=len(report.failed))
    report.wall_seconds = time.perf_counter() - start
    return report


def _read_parts(out: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted((out / "parts").glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no built models under {out / 'parts'}; run build_zoo first")
    # The parts carry the HF schema in their metadata; concat keeps the first one's.
    return pa.concat_tables([pq.read_table(p) for p in parts])


def accuracy_floor_rejects(
    metadata: list[dict[str, Any]], margin: float, chance_margin: float = 0.0
) -> dict[str, str]:
    """Models whose clean accuracy is below the median clean model of the same (dataset, architecture) minus
    ``margin``, or below chance (``1 / classes``) plus ``chance_margin``; returns ``{model_id: reason}``.

    The chance floor matters because the median floor is relative: when the clean models of a kind collapsed too, a
    collapsed backdoored model passes it with a meaningless ASR of 1.0. Kinds without clean models get only the chance
    floor (a warning is logged).
    """
    import numpy as np

    from .spec import NUM_CLASSES

    clean: dict[tuple[str, str], list[float]] = {}
    for m in metadata:
        if not m["is_backdoored"]:
            clean.setdefault((m["dataset"], m["architecture"]), []).append(float(m["clean_accuracy"]))
    medians = {k: float(np.median(v)) for k, v in clean.items()}
    out = {}
    for m in metadata:
        kind = (m["dataset"], m["architecture"])
        acc = float(m["clean_accuracy"])
        chance = 1.0 / NUM_CLASSES[m["dataset"]] if m["dataset"] in NUM_CLASSES else None
        if chance is not None and acc < chance + chance_margin:
            out[m["model_id"]] = (
                f"clean accuracy {acc:.3f} < chance floor {chance + chance_margin:.3f} (chance {chance:.3f} + margin "
                f"{chance_margin})"
            )
            continue
        if kind not in medians:
            logger.warning("no clean %s/%s model: median accuracy floor not applied to %s", *kind, m["model_id"])
            continue
        floor = medians[kind] - margin
        if acc < floor:
            out[m["model_id"]] = (
                f"clean accuracy {acc:.3f} < floor {floor:.3f} (median clean "
                f"{kind[0]}/{kind[1]} {medians[kind]:.3f} - margin {margin})"
            )
    return out


def finalize_zoo(out_dir: str | os.PathLike, *, report_path: str | os.PathLike | None = None):
    """Merge the parts into the dataset layout (``data/``, ``metadata/``, ``README.md``) and write the report.

    Applies the accuracy floor (which needs every clean model, hence here rather than in :func:`build_zoo`):
    models below it are moved to ``rejected/`` (stage ``accuracy_floor``; recomputed on every finalize).

    Args:
        out_dir: the build folder.
        report_path: also write the markdown report there (e.g. ``benchmarks/meta/results/standard_zoo.md``); it is
            always written to ``out_dir/zoo_report.md``.

    Returns:
        The accepted models as a ``datasets.Dataset`` (what :func:`load_zoo` gives back).
    """
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from .schema import render_card, render_report

    out = Path(out_dir)
    saved = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
    config = ZooConfig.from_dict(saved["config"]) if saved else None
    table = _read_parts(out)
    metadata = table.drop_columns(list(HEAVY_COLUMNS)).to_pylist()
    rejected_dir = out / "rejected"
    rejected_dir.mkdir(exist_ok=True)
    for p in rejected_dir.glob("*.json"):  # accuracy-floor rejects are recomputed from the current clean medians
        if json.loads(p.read_text()).get("stage") == "accuracy_floor":
            p.unlink()
    margin = config.acc_margin if config else 0.05
    acc_rejects = accuracy_floor_rejects(metadata, margin, config.chance_margin if config else 0.0)
    for m in metadata:
        if m["model_id"] in acc_rejects:
            _write_json(
                rejected_dir / f"{m['model_id']}.json",
                {"stage": "accuracy_floor", "reason": acc_rejects[m["model_id"]], **m},
            )
    order = {s_id: i for i, s_id in enumerate(ModelSpec.from_dict(s).model_id for s in saved.get("specs", []))}
    keep = [i for i, m in enumerate(metadata) if m["model_id"] not in acc_rejects]
    keep.sort(key=lambda i: (order.get(metadata[i]["model_id"], len(order)), metadata[i]["model_id"]))
    if not keep:
        raise ValueError(f"every built model in {out} was rejected; see {rejected_dir}")
    # One slice per row, concatenated without copying: `take` would join the rows' checkpoint bytes into one array,
    # and a zoo with pretrained-size rows passes the 2 GiB offset limit of a binary column.
    import pyarrow as pa

    ds = Dataset(InMemoryTable(pa.concat_tables([table.slice(i, 1) for i in keep]))).cast(FEATURES)

    for sub in ("data", "metadata"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir()
    n_shards = max(1, -(-ds.data.nbytes // MAX_SHARD_BYTES))
    for k in range(n_shards):
        shard = ds.shard(num_shards=n_shards, index=k, contiguous=True)
        shard.to_parquet(str(out / "data" / f"train-{k:05d}-of-{n_shards:05d}.parquet"), batch_size=ROW_GROUP_SIZE)
    meta_ds = ds.remove_columns(list(HEAVY_COLUMNS))
    meta_ds.to_parquet(str(out / "metadata" / "train.parquet"))

    rejects = [json.loads(p.read_text()) for p in sorted(rejected_dir.glob("*.json"))]
    failures = [json.loads(p.read_text()) for p in sorted((out / "failed").glob("*.json"))]
    accepted = meta_ds.to_list()
    (out / "README.md").write_text(render_card(config, accepted, rejects))
    report = render_report(config, accepted, rejects, failures, planned=len(saved.get("specs", [])) or None)
    (out / "zoo_report.md").write_text(report)
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(report)
    logger.info("zoo finalized: %d accepted, %d rejected, %d failed -> %s", len(ds), len(rejects), len(failures), out)
    return ds


def load_zoo(path_or_hub_id: str | os.PathLike, split: str = "train", *, config_name: str | None = None):
    """Load a finalized zoo with ``datasets.load_dataset`` (a local build folder or a Hub dataset id).

    Args:
        path_or_hub_id: the folder :func:`finalize_zoo` wrote, or ``"org/name"`` on the Hub.
        split: ``"train"``.
        config_name: ``None`` (all columns) or ``"metadata"`` (no checkpoint files and probe inputs: fast to browse).

    Example:
        ```python
        zoo = load_zoo("zoo_tiny")
        target = row_to_target(zoo[0])
        ```
    """
    import datasets

    kwargs: dict[str, Any] = {}
    folder = Path(path_or_hub_id)
    if folder.is_dir():
        # datasets caches a local folder under its name only (.../datasets/tiny/default/0.0.0/<fixed hash>), so a
        # rebuilt zoo, or another zoo folder of the same name, would silently load the old rows: key the cache by
        # the data files themselves (resolved path, size, mtime).
        stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*.parquet"))]
        key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
        kwargs["cache_dir"] = str(Path(datasets.config.HF_DATASETS_CACHE) / "metashield_zoo" / key)
    return datasets.load_dataset(str(path_or_hub_id), config_name, split=split, **kwargs)


def row_to_target(row: dict[str, Any], workdir: str | os.PathLike | None = None, **load_kwargs: Any):
    """Turn a zoo row back into a loaded target adapter (``load_target`` on the row's checkpoint files).

    Args:
        row: a zoo row (``zoo[i]``), with its ``checkpoint`` column.
        workdir: where to write the files (kept); ``None`` = a temporary folder removed after loading.
        **load_kwargs: passed to ``load_target`` (e.g. ``batch_size``, ``device``).

    Returns:
        The ``TargetAdapter``; ``target(probe_inputs).logits`` reproduces the row's stored ASR.
    """
    from ..targets import load_target

    if workdir is not None:
        folder = write_checkpoint(row, Path(workdir) / row["model_id"])
        return load_target(folder, **load_kwargs)
    with tempfile.TemporaryDirectory(prefix="metashield-zoo-") as tmp:
        return load_target(write_checkpoint(row, Path(tmp) / row["model_id"]), **load_kwargs)
