"""Reading clean samples and inputs from what a user has: a text file, an image folder, a table, a `datasets` dataset."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TABLE_LOADERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _column(ds, column: str | None) -> list:
    if column is not None:
        if column not in ds.column_names:
            raise ValueError(f"column {column!r} not in {ds.column_names}")
        return list(ds[column])
    for name, feature in ds.features.items():
        kind = type(feature).__name__
        if kind == "Image" or (kind == "Value" and feature.dtype in ("string", "large_string")):
            return list(ds[name])
    raise ValueError(f"no text or image column in {ds.column_names}; name one with SPEC:split:column")


def load_samples(spec: str | Path, n: int | None = None, *, seed: int = 0) -> list:
    """Load inputs from ``spec``.

    Args:
        spec: a text file (one input per line), a folder of images, a CSV/TSV/JSONL/parquet file (first text or image
            column, or ``FILE::column``), or a `datasets` name/folder with optional ``:split[:column]``.
        n: keep the first ``n`` (after a seeded shuffle for datasets and tables).
        seed: shuffle seed.

    Returns:
        A list of ``str`` or ``PIL.Image``.
    """
    from datasets import load_dataset

    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items = []
        for p in files[:n] if n else files:
            try:
                with Image.open(p) as im:
                    items.append(im.copy())
            except OSError as err:
                raise ValueError(f"cannot read image {p}: {err}") from err
        return items
    file_part, _, col = spec.partition("::")
    fpath = Path(file_part)
    if fpath.is_file():
        suffix = fpath.suffix.lower()
        if suffix in TABLE_LOADERS:
            kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
            try:
                ds = load_dataset(TABLE_LOADERS[suffix], data_files=str(fpath), split="train", **kwargs)
            except Exception as err:  # datasets raises several types for unreadable files
                raise ValueError(f"cannot read {fpath} as {suffix[1:]}: {err}") from err
            ds = ds.shuffle(seed=seed) if n else ds
            items = _column(ds, col or None)
            return items[:n] if n else items
        try:
            lines = [line.strip() for line in fpath.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as err:
            raise ValueError(f"{fpath} is not a UTF-8 text file (one sample per line): {err}") from err
        lines = [line for line in lines if line]
        return lines[:n] if n else lines
    name, _, rest = spec.partition(":")
    split, _, column = rest.partition(":")
    if Path(name).exists() or "/" in name or not path.suffix:
        try:
            ds = load_dataset(name, split=split or "train")
        except Exception as err:
            raise ValueError(
                f"cannot load samples from {spec!r}: not a file, an image folder or a dataset ({err})"
            ) from err
        ds = ds.shuffle(seed=seed) if n else ds
        items = _column(ds, column or None)
        return items[:n] if n else items
    raise ValueError(f"no such file or folder: {spec}")
