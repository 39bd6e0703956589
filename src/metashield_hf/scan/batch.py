"""Scan many checkpoints into one table: ``metashield scan --from_file ids.txt`` and ``metashield scan --hf_cache``.

[`scan_many`] runs [`scan_model`] on each checkpoint and writes one row per checkpoint (id, commit hash, verdict,
score, suspected target, seconds, error) to a parquet table with a dataset card, which ``datasets.load_dataset(out)``
loads::

    out/
      data/train-00000-of-00001.parquet   the table (every row scanned so far)
      README.md                           the dataset card (its ``configs`` name the table)
      parts/<key>.json                    one row per scanned checkpoint, written as soon as its scan ends

It is resumable: a checkpoint whose row (same id, same commit) is in the table or in ``parts/`` without an error is
skipped on a rerun; rows with an error are scanned again. A Hub id resolves through the local Hugging Face cache first
(so an offline machine scans what it has, and an online one does not download a model it already holds), and the row
pins the commit hash of the snapshot that was scanned; ``org/name@revision`` scans another revision. The scan loads the
snapshot's folder itself, so the row's commit is the one scanned even if ``refs/main`` moves meanwhile.

Sharding reuses the zoo build's approach (``metashield_hf.zoo.build``): process ``i`` of ``n`` scans
``checkpoints[i::n]`` and writes its rows to ``parts/``; once every process has marked itself done, process 0 merges
them into the table. The CLI reads ``i`` and ``n`` from the launcher's ``RANK`` / ``WORLD_SIZE`` (``accelerate
launch``, ``torchrun``), over processes of one machine or of several that share ``out``::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m metashield_hf.cli scan --hf_cache --clean_samples clean.txt --out scans

The exit code of a batch scan (``BatchScanResult.exit_code``): 2 if any row of this run has an error, else 1 if any is
backdoored, else 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BATCH_COLUMNS",
    "BatchScanResult",
    "CheckpointRef",
    "cached_classifiers",
    "is_classifier_folder",
    "load_scan_table",
    "read_checkpoint_list",
    "resolve_checkpoint",
    "scan_many",
]

#: The table's columns and what each holds (also the dataset card's column list).
BATCH_COLUMNS = {
    "id": "the checkpoint as listed: a Hub id (`org/name`) or a local folder",
    "revision": "the commit hash of the snapshot scanned (empty for a folder outside the Hugging Face cache)",
    "verdict": "`backdoored` or `clean` (empty when the scan failed)",
    "score": "the scan's backdoor score in [0, 1]",
    "threshold": "the score above which the verdict is `backdoored`",
    "target": "the suspected target class (the class easiest to force)",
    "target_label": "that class's name (`config.id2label`)",
    "seconds": "wall-clock seconds of this checkpoint's load and scan",
    "error": "the error, on one line, where the scan failed (empty otherwise)",
}
DATA_FILE = Path("data") / "train-00000-of-00001.parquet"
# The files a scan reads from a Hub snapshot (as resolve_folder downloads them).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.tiktoken"]
# Seconds between process 0's looks at the barrier folder while the other shards finish.
_POLL_S = 1.0


def _features():
    from datasets import Features, Value

    types = {"score": "float64", "threshold": "float64", "target": "int64", "seconds": "float64"}
    return Features({name: Value(types.get(name, "string")) for name in BATCH_COLUMNS})


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint to scan: the id its row carries, the commit hash (``None`` outside the Hugging Face cache) and
    the folder the scan loads."""

    id: str
    revision: str | None
    folder: Path

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.id, self.revision)


@dataclass
class BatchScanResult:
    """What [`scan_many`] did.

    Attributes:
        out_dir: the output folder.
        table: the parquet table (``None`` on a process other than 0 of a sharded run, which does not merge).
        rows: the table's rows of this run's checkpoints (process 0), or the rows this process wrote.
        scanned / skipped: ids (``id@revision`` where there is one) scanned now, and skipped as already in the table.
        process_index / num_processes: this process's shard.
    """

    out_dir: Path
    table: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    scanned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    process_index: int = 0
    num_processes: int = 1

    @property
    def exit_code(self) -> int:
        """2 if any row has an error, else 1 if any row is backdoored, else 0 (what ``metashield scan`` returns)."""
        if any(r["error"] for r in self.rows):
            return 2
        return 1 if any(r["verdict"] == "backdoored" for r in self.rows) else 0


# ---- which checkpoints ----------------------------------------------------------------------------------------------
def read_checkpoint_list(path: str | os.PathLike) -> list[str]:
    """The checkpoints listed in a text file, one per line (``org/name``, ``org/name@revision`` or a folder); blank
    lines and ``#`` comments are skipped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint list {str(path)!r}; pass a text file with one Hub id or folder a line")
    ids = [line.split("#", 1)[0].strip() for line in file.read_text().splitlines()]
    ids = [i for i in ids if i]
    if not ids:
        raise ValueError(f"{path} lists no checkpoint; write one Hub id or folder a line")
    return ids


def is_classifier_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a classifier MetaShield can scan: a transformers sequence or image classifier (by its
    ``config.json`` ``architectures`` or ``auto_map``), a timm model, or a PEFT adapter for sequence classification."""
    from ..targets.transformers_models import config_classifier_kinds

    folder = Path(folder)
    try:
        if (folder / "adapter_config.json").is_file():
            return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        if not (folder / "config.json").is_file():
            return False
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if "model_type" not in config and ("architecture" in config or "pretrained_cfg" in config):
        return int(config.get("num_classes", 1) or 0) > 0  # timm
    return bool(config_classifier_kinds(config))


def cached_classifiers(cache_dir: str | os.PathLike | None = None) -> list[CheckpointRef]:
    """Every classifier in the local Hugging Face cache ([`huggingface_hub.scan_cache_dir`]), one per cached revision
    (a program pinned to an older commit loads that snapshot, so each is scanned), sorted by id and commit.

    Args:
        cache_dir: the hub cache (default: ``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``).

    Returns:
        A [`CheckpointRef`] per classifier snapshot; models that are not classifiers, datasets and Spaces are left out
        (logged).
    """
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir)
    for warning in info.warnings:
        logger.warning("Hugging Face cache: %s", warning)
    refs, others = [], []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            if is_classifier_folder(rev.snapshot_path):
                refs.append(CheckpointRef(repo.repo_id, rev.commit_hash, Path(rev.snapshot_path)))
            else:
                others.append(f"{repo.repo_id}@{rev.commit_hash[:12]}")
    if others:
        logger.info("not classifiers, not scanned: %s", ", ".join(others))
    return refs


def _snapshot_revision(folder: Path) -> str | None:
    """The commit of a folder that is a Hugging Face cache snapshot (``.../snapshots/<commit>``), else ``None``."""
    name = folder.resolve().name
    if folder.resolve().parent.name == "snapshots" and len(name) == 40 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def resolve_checkpoint(
    spec: str | os.PathLike | CheckpointRef,
    *,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> CheckpointRef:
    """The folder and commit of one listed checkpoint: a local folder as it is, a Hub id through the local cache
    first (downloaded only when it is not there and the Hub is reachable).

    Args:
        spec: ``org/name``, ``org/name@revision`` (a branch, tag or commit), a folder, or a [`CheckpointRef`].
        cache_dir: the hub cache (default: ``HF_HUB_CACHE``).
        allow_pickle / trust_remote_code: also fetch ``*.bin`` weights / ``*.py`` code when downloading.

    Returns:
        A [`CheckpointRef`] whose ``revision`` is the snapshot's commit hash.

    Example:
        ```python
        >>> resolve_checkpoint("org/sst2-bert").revision
        '4f1c0a3b...'
        ```
    """
    if isinstance(spec, CheckpointRef):
        return spec
    from ..targets.loading import looks_local

    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return CheckpointRef(text, _snapshot_revision(path), path)
    if path.exists():
        raise ValueError(f"{text!r} is a file; list the checkpoint folder that contains it")
    if looks_local(text):
        raise FileNotFoundError(f"no folder {text!r}: it does not exist (check the path)")
    from huggingface_hub import constants, snapshot_download

    repo_id, _, revision = text.partition("@")
    patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    kwargs = {"revision": revision or None, "cache_dir": cache_dir, "allow_patterns": patterns}
    try:  # the cache first: no request at all for a model already held
        folder = snapshot_download(repo_id, local_files_only=True, **kwargs)
    except Exception as cached_err:  # not in the cache (or not that revision)
        where = cache_dir or constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise OSError(
                f"{text!r} is not in the Hugging Face cache {where} and the Hub is offline (HF_HUB_OFFLINE=1); "
                f"download it first or list its folder ({type(cached_err).__name__})"
            ) from cached_err
        try:
            folder = snapshot_download(repo_id, **kwargs)
        except Exception as e:
            raise OSError(
                f"{text!r} is neither in the Hugging Face cache {where} nor loadable from the Hub "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the id"
            ) from e
    folder = Path(folder)
    return CheckpointRef(repo_id, folder.name, folder)


def _spec_id(spec) -> str:
    if isinstance(spec, CheckpointRef):
        return spec.id
    text = str(spec).strip()
    return text if Path(text).expanduser().is_dir() else text.partition("@")[0]


# ---- the table ------------------------------------------------------------------------------------------------------
def _label(key: tuple[str, str | None]) -> str:
    return key[0] if key[1] is None else f"{key[0]}@{key[1]}"


def _part_path(out: Path, key: tuple[str, str | None]) -> Path:
    return out / "parts" / f"{hashlib.sha1(_label(key).encode()).hexdigest()[:20]}.json"


def _write_part(out: Path, row: dict[str, Any]) -> None:
    path = _part_path(out, (row["id"], row["revision"]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row, sort_keys=True))
    tmp.replace(path)  # atomic: a crash never leaves a half-written row that a rerun would trust


def load_scan_table(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a batch scan's table merged with the rows in ``parts/`` not yet merged (a part wins over the table's
    row of the same id and commit), sorted by id and commit."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    if (out / DATA_FILE).is_file():
        for row in pq.read_table(out / DATA_FILE).to_pylist():
            rows[(row["id"], row["revision"])] = row
    for part in sorted((out / "parts").glob("*.json")):
        row = json.loads(part.read_text())
        rows[(row["id"], row["revision"])] = {c: row.get(c) for c in BATCH_COLUMNS}
    # a failed lookup has no commit; once the same id scanned, its row replaces that error
    resolved = {rid for rid, rev in rows if rev is not None}
    merged = [r for (rid, rev), r in rows.items() if not (rev is None and r["error"] and rid in resolved)]
    return sorted(merged, key=lambda r: (r["id"], r["revision"] or ""))


def _render_card(rows: list[dict[str, Any]]) -> str:
    from huggingface_hub import DatasetCardData

    n = len(rows)
    data = DatasetCardData(
        pretty_name="MetaShield checkpoint scans",
        tags=["backdoor", "trojan", "ai-safety", "model-scan", "metashield"],
        size_categories=["n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
    )
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("backdoored", "clean")}
    errors = sum(bool(r["error"]) for r in rows)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# MetaShield checkpoint scans",
        "",
        f"{n} checkpoints scanned with `metashield scan` (MetaShield's model-level backdoor scan): "
        f"{counts['backdoored']} backdoored, {counts['clean']} clean, {errors} failed. One row per checkpoint and "
        "commit; a rerun of the same command skips the rows already here and retries the failed ones.",
        "",
        "```python",
        "from datasets import load_dataset",
        'scans = load_dataset("<this folder>", split="train")',
        'flagged = scans.filter(lambda r: r["verdict"] == "backdoored")',
        "```",
        "",
        "## Columns",
        "",
        "| column | description |",
        "|---|---|",
        *(f"| `{name}` | {doc} |" for name, doc in BATCH_COLUMNS.items()),
        "",
        "A verdict is a screening result, not a proof: a clean verdict lowers the odds of a backdoor the scan can "
        "synthesize a trigger for; see the MetaShield documentation for what the scan covers.",
        "",
    ]
    return "\n".join(lines)


def _write_table(out: Path) -> tuple[Path, list[dict[str, Any]]]:
    from datasets import Dataset

    rows = load_scan_table(out)
    table = out / DATA_FILE
    table.parent.mkdir(parents=True, exist_ok=True)
    tmp = table.with_name(f".{table.name}.{os.getpid()}.tmp")
    Dataset.from_list(rows, features=_features()).to_parquet(str(tmp), batch_size=1000)
    tmp.replace(table)
    (out / "README.md").write_text(_render_card(rows))
    return table, rows


# ---- scanning -------------------------------------------------------------------------------------------------------
def _error_row(key: tuple[str, str | None], err: BaseException, seconds: float) -> dict[str, Any]:
    from ..arguments import error_line

    return {
        **dict.fromkeys(BATCH_COLUMNS),
        "id": key[0],
        "revision": key[1],
        "seconds": seconds,
        "error": error_line(err),
    }


def _wait_for_shards(done: Path, num_processes: int, timeout_s: float | None) -> None:
    start = time.monotonic()
    while len(list(done.iterdir())) < num_processes:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"only {len(list(done.iterdir()))} of {num_processes} processes finished their shard within "
                f"{timeout_s:.0f} s; rerun the same command to resume (finished rows are kept in {done.parent.parent})"
            )
        time.sleep(_POLL_S)


def scan_many(
    checkpoints: list,
    clean_samples,
    out_dir: str | os.PathLike,
    config=None,
    *,
    detector=None,
    cache_dir: str | os.PathLike | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    launch_id: str | None = None,
    wait_timeout_s: float | None = None,
) -> BatchScanResult:
    """Scan many checkpoints with [`scan_model`] into one parquet table with a dataset card; resumable and sharded.

    Args:
        checkpoints: Hub ids (``org/name``, ``org/name@revision``), folders, or [`CheckpointRef`] (e.g. from
            [`cached_classifiers`]); every process of a sharded run must pass the same list in the same order.
        clean_samples: the clean samples every checkpoint is scanned with (one modality), as [`scan_model`] takes
            them; a spec string is loaded once.
        out_dir: the output folder (see the module docstring).
        config: the scan's options ([`ScanConfig`]); the same for every checkpoint.
        detector: the input-level detector (default: the embedded one), loaded once.
        cache_dir: the Hugging Face hub cache that Hub ids resolve through (default: ``HF_HUB_CACHE``).
        process_index / num_processes: this process's shard: it scans ``checkpoints[process_index::num_processes]``.
        launch_id: names this run's barrier (default: the parent process id, which the processes of one launch share,
            as in the zoo build); only read when ``num_processes > 1``.
        wait_timeout_s: how long process 0 waits for the other shards before it raises (default: no limit).

    Returns:
        A [`BatchScanResult`]; its ``exit_code`` is 2 if a row of this run failed, else 1 if one is backdoored, else 0.

    Example:
        ```python
        >>> from metashield_hf.scan import ScanConfig, cached_classifiers, scan_many
        >>> result = scan_many(cached_classifiers(), "clean.txt", "scans", ScanConfig(steps=40))
        >>> result.table
        PosixPath('scans/data/train-00000-of-00001.parquet')
        >>> datasets.load_dataset("scans", split="train")[0]["verdict"]
        'clean'
        ```
    """
    from tqdm.auto import tqdm

    from .config import ScanConfig
    from .progress import tqdm_disable
    from .scanner import scan_model

    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} must be in [0, {num_processes})")
    if not checkpoints:
        raise ValueError("no checkpoint to scan: pass Hub ids or folders (or a cache that holds classifiers)")
    config = config or ScanConfig()
    out = Path(out_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    # what every scan shares, made once: a bad device fails here, not as one error row per checkpoint
    from ..targets.loading import resolve_device

    if config.device is not None:
        resolve_device(config.device)
    config = config.replace(head=config.load_head())
    if isinstance(clean_samples, (str, os.PathLike)):
        from ..samples import load_samples

        clean_samples = load_samples(clean_samples, config.n, seed=config.seed)
    if config.use_detector and (detector is None or isinstance(detector, (str, os.PathLike))):
        from ..loading import load_detector

        detector = load_detector(detector, one_pass=True)
    done = {(r["id"], r["revision"]) for r in load_scan_table(out) if not r["error"]}
    mine = list(checkpoints)[process_index::num_processes]
    result = BatchScanResult(out, None, process_index=process_index, num_processes=num_processes)
    bar = tqdm(
        mine, desc="scan checkpoints", unit="model", disable=tqdm_disable(config.progress) or process_index != 0
    )
    for spec in bar:
        t0 = time.perf_counter()
        key = (_spec_id(spec), None)
        try:
            ref = resolve_checkpoint(
                spec, cache_dir=cache_dir, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code
            )
            key = ref.key
            if key in done:
                result.skipped.append(_label(key))
                continue
            report = scan_model(str(ref.folder), clean_samples, detector, config)
            row = {
                "id": ref.id,
                "revision": ref.revision,
                "verdict": report.verdict,
                "score": float(report.score),
                "threshold": float(report.threshold),
                "target": int(report.suspected_target),
                "target_label": report.suspected_target_label,
                "seconds": time.perf_counter() - t0,
                "error": None,
            }
        except Exception as err:  # one broken checkpoint must not stop the batch: its row says why, a rerun retries
            logger.warning("scan of %s failed: %s", _label(key), err, exc_info=logger.isEnabledFor(logging.DEBUG))
            row = _error_row(key, err, time.perf_counter() - t0)
        _write_part(out, row)
        result.rows.append(row)
        result.scanned.append(_label(key))
        bar.set_postfix(scanned=len(result.scanned), skipped=len(result.skipped))
    if num_processes > 1:
        barrier = out / "logs" / f".done-{launch_id or os.getppid()}"
        barrier.mkdir(parents=True, exist_ok=True)
        (barrier / str(process_index)).touch()
        if process_index != 0:
            return result
        _wait_for_shards(barrier, num_processes, wait_timeout_s)
        for marker in barrier.iterdir():  # a later launch with the same id starts a fresh barrier
            marker.unlink()
        barrier.rmdir()
    result.table, rows = _write_table(out)
    wanted = {_spec_id(spec) for spec in checkpoints}
    result.rows = [r for r in rows if r["id"] in wanted]
    logger.info(
        "batch scan -> %s: %d scanned, %d skipped (already in the table), %d rows in this run's table",
        result.table,
        len(result.scanned),
        len(result.skipped),
        len(result.rows),
    )
    return result
