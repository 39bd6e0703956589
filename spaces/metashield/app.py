"""MetaShield Space: scan a classifier for a backdoor, or check inputs to it for triggers (Gradio Blocks).

Run locally with ``python spaces/metashield/app.py [--port 7860] [--host 127.0.0.1]``. On a Hugging Face Space the
same file is the ``app_file``: Spaces set ``GRADIO_SERVER_NAME=0.0.0.0`` and the port, which are honoured here.

Two tabs, each also an API endpoint (``gradio_client.Client(url).predict(..., api_name=...)``):

- ``/scan``: model-level scan ([`metashield_hf.scan_model`]) from a few clean samples, no triggered input needed.
- ``/check``: input-level detection ([`MetaShieldDetector.adapt`]) with a threshold calibrated on the clean samples.

Everything runs offline on a CPU with the embedded detector and the bundled example checkpoints
([`metashield_hf.zoo.examples.load_bundled_example`], trained once and cached).

A public Space must not let visitors read its disk or run their code. So a model comes from a bundled example, a Hub
id (``org/name``, checked against that pattern; a string that names anything on the server's disk is refused) or an
uploaded ``.zip`` of a checkpoint folder, which is extracted safely ([`extract_checkpoint`]: no absolute or ``..``
paths, no links, a size limit). Pickle-only weights and remote code (``auto_map``) are refused with a message; only
safetensors and the config, tokenizer and processor files are read.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import metashield_hf
except ImportError:  # running from a checkout without `pip install -e .`: use the repo's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    import metashield_hf

import gradio as gr
import pandas as pd
import torch

from metashield_hf.scan.pictures import COLUMNS, evidence_rows, render_report, write_html_report
from metashield_hf.zoo.examples import (
    BUNDLED_EXAMPLES,
    BundledExample,
    digits_image_to_tensor,
    digits_tensor_to_image,
    load_bundled_example,
)

__all__ = ["build_demo", "check", "extract_checkpoint", "hub_id", "launch_kwargs", "main", "scan"]

logger = logging.getLogger("metashield_space")

SOURCE_EXAMPLE = "Bundled example"
SOURCE_HUB = "Hub id"
SOURCE_UPLOAD = "Upload a checkpoint (.zip)"
MIN_SCAN, MIN_CHECK = 5, 5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
REPORT_DIR = Path(tempfile.gettempdir()) / "metashield-space"
UPLOAD_DIR = REPORT_DIR / "uploads"
# A Hub repo id: "org/name", letters, digits, "-", "_", "." (no "..", no leading "." or "-"): never a server path.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MAX_UNPACKED_BYTES = 1 << 30  # a CPU Space scans small classifiers; a larger zip is refused before extraction
MAX_ZIP_MEMBERS = 512
# What an uploaded checkpoint may contain that is read: config, weights (safetensors), tokenizer and processor files.
CHECKPOINT_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".tiktoken", ".md"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack"}
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
DOMAINS_NOTE = (
    "**Bundled examples** (trained here on first use, then cached). *Vision, the tool at its best*: a tiny CNN on "
    "scikit-learn's 8×8 digits with a BadNets corner patch (target class 0): the synthesized trigger of class 0 lands "
    "on the patch's corner and the scan says *backdoored*; its clean twin shows what a clean model's triggers look like "
    "(strokes of the digits, none an outlier). *Text*: a tiny BERT on a few hundred SST-2 phrases with the rare-word "
    "trigger `cf` (target *positive*) and its clean twin; the token search finds short triggers for a clean model too "
    "(strong sentiment words), so read the class probability and the detector score, not the trigger alone.\n\n"
    "**Limits, honestly**: the anomaly index is a median over classes, so a binary image model cannot single out a "
    "target; a trigger spread over the whole input (a blend, a warp) or one that needs the source class is harder to "
    "synthesize than a patch; a few clean samples give a noisy verdict — read the pictures. *Federated, a limit*: the "
    "same CNN trained by FedAvg over ten digits clients, one of which stamps the BadNets patch on its data and boosts "
    "its update from round 21 of 30 (and its clean twin): the trigger works on the global model, yet the scan calls it "
    "*clean* (it names class 0 as the suspect, below the threshold), while the check tab flags the patched inputs."
)


# ---- resolving the target -----------------------------------------------------------------------------------------
@dataclass
class Target:
    """What the user picked: a model (object, folder or adapter), its modality, and the bundled example if any."""

    name: str
    model: Any
    modality: str  # "image" or "text"
    example: BundledExample | None = None

    @property
    def is_digits(self) -> bool:
        """The bundled digits CNNs (vision and federated) take ``(1, 8, 8)`` tensors, so pictures are converted for
        them."""
        return self.example is not None and self.example.modality == "image"

    def num_classes(self) -> int | None:
        from metashield_hf.targets.transformers_models import unwrap

        model = unwrap(getattr(self.model, "model", self.model))
        n = getattr(getattr(model, "config", None), "num_labels", None)
        if n is None and hasattr(model, "classifier"):
            n = getattr(model.classifier, "out_features", None)
        return n


@functools.lru_cache(maxsize=8)
def _example(key: str) -> BundledExample:
    return load_bundled_example(key)


@functools.lru_cache(maxsize=1)
def _detector():
    return metashield_hf.load_detector()


def hub_id(text: str | None) -> str:
    """``text`` as a Hub repo id, or a gr.Error: anything but ``org/name``, or a name that exists on the server's disk
    (a relative folder such as ``spaces/metashield``), is refused, so that visitors cannot probe the server."""
    model_id = (text or "").strip()
    if not model_id:
        raise gr.Error("The Hub id field is empty: give a Hub model id such as org/name.")
    if not HUB_ID.match(model_id) or ".." in model_id:
        raise gr.Error(
            f"{model_id[:80]!r} is not a Hub id: give org/name (letters, digits, '-', '_', '.'). This Space does not "
            "read paths on its server; upload a .zip of your checkpoint folder instead."
        )
    if os.path.lexists(model_id):
        raise gr.Error(
            f"{model_id!r} is refused: this Space loads Hub ids from the Hub only, never from its own disk. Upload a "
            ".zip of your checkpoint folder instead."
        )
    return model_id


def _unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry must not be extracted (absolute path, ``..``, a link, a device), or None."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
        return "an absolute or Windows path"
    if ".." in parts:
        return "a '..' path that points outside the folder"
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type; 0 where the zip tool stored permissions only
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return "a link or special file"
    return None


def _check_config_files(folder: Path, shown: str) -> None:
    """Refuse remote code: an ``auto_map`` or ``custom_pipelines`` in any JSON file of the checkpoint."""
    for file in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise gr.Error(f"{shown}: {file.name} is not valid JSON ({e}).") from e
        found = [k for k in REMOTE_CODE_KEYS if isinstance(data, dict) and k in data]
        if found:
            raise gr.Error(
                f"{shown} asks for remote code ({found[0]} in {file.name}): this Space never runs a checkpoint's own "
                "Python code. Scan it on your machine with `metashield scan ... --trust_remote_code` if you trust it."
            )


def extract_checkpoint(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract an uploaded checkpoint zip into ``dest`` safely and return the folder holding its ``config.json``.

    Refused with a gr.Error that says why: not a zip, too many entries or too many bytes unpacked, an absolute or
    ``..`` path, a link, pickle-only weights (``pytorch_model.bin`` and no safetensors), no ``config.json``, or remote
    code (``auto_map``). Only config, safetensors, tokenizer and processor files are extracted; pickle files and Python
    files are left in the zip.
    """
    if not zipfile.is_zipfile(zip_path):
        raise gr.Error("The upload is not a .zip file: zip your checkpoint folder (config + safetensors + tokenizer).")
    dest = Path(dest)
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise gr.Error(f"The zip has {len(infos)} entries; a checkpoint folder has at most {MAX_ZIP_MEMBERS}.")
        for info in infos:
            why = _unsafe_member(info)
            if why:
                raise gr.Error(f"The zip is refused: its entry {info.filename[:120]!r} is {why}.")
        files = [i for i in infos if not i.is_dir()]
        suffixes = {Path(i.filename).suffix.lower() for i in files}
        if not any(i.filename.endswith(".safetensors") for i in files):
            pickles = sorted(
                Path(i.filename).name for i in files if Path(i.filename).suffix.lower() in PICKLE_SUFFIXES
            )
            if pickles:
                raise gr.Error(
                    f"The zip only has pickle weights ({', '.join(pickles[:3])}): a pickle can run code when loaded, "
                    "so this Space reads safetensors only. Save the model with save_pretrained() (it writes "
                    "model.safetensors) and zip that folder."
                )
            raise gr.Error("The zip has no model.safetensors: zip the whole folder that save_pretrained() wrote.")
        keep = [i for i in files if Path(i.filename).suffix.lower() in CHECKPOINT_SUFFIXES]
        total = sum(i.file_size for i in keep)
        if total > MAX_UNPACKED_BYTES:
            raise gr.Error(
                f"The checkpoint unpacks to {total / 2**20:.0f} MiB; this CPU Space scans models up to "
                f"{MAX_UNPACKED_BYTES / 2**20:.0f} MiB. Scan a large model with the metashield command on your machine."
            )
        if ".py" in suffixes:
            logger.info("upload: Python files are not extracted (remote code is refused)")
        root = dest.resolve()
        for info in keep:
            target = (dest / info.filename).resolve()
            if root not in target.parents:  # belt and braces after _unsafe_member
                raise gr.Error(f"The zip is refused: {info.filename[:120]!r} would be written outside its folder.")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > info.file_size:  # the header lied about the size (a zip bomb)
                        raise gr.Error(f"The zip is refused: {info.filename[:120]!r} is larger than it declares.")
                    out.write(chunk)
    configs = sorted(dest.rglob("config.json"), key=lambda f: len(f.parts))
    if not configs:
        raise gr.Error("The zip has no config.json: zip the whole folder that save_pretrained() wrote.")
    folder = configs[0].parent
    _check_config_files(folder, "The uploaded checkpoint")
    return folder


def _load(source_name: str, folder: Path) -> Any:
    try:
        adapter = metashield_hf.load_target(folder)
    except (ValueError, OSError, TypeError) as e:
        raise gr.Error(f"{source_name} is not a model MetaShield can load: {e}") from e
    if adapter.modality not in ("image", "text"):
        raise gr.Error(
            f"{source_name} loaded as a {adapter.modality} model; this Space handles text and image models."
        )
    return adapter


def resolve_target(source: str, example_key: str | None, model_id: str | None, upload=None) -> Target:
    """The target from the form, or a gr.Error that says what to fix."""
    if source == SOURCE_EXAMPLE:
        if not example_key:
            raise gr.Error("Pick a bundled example, or give a Hub id or upload a checkpoint.")
        if example_key not in BUNDLED_EXAMPLES:
            raise gr.Error(f"Unknown bundled example {example_key!r}; pick one of {sorted(BUNDLED_EXAMPLES)}.")
        try:
            ex = _example(example_key)
        except FileNotFoundError as e:  # the SST-2 pair needs its training data
            raise gr.Error(f"The example {example_key!r} cannot be built here: {e}") from e
        return Target(ex.title, ex.model, ex.modality, ex)
    if source == SOURCE_UPLOAD:
        paths = _paths([upload] if upload and not isinstance(upload, list) else upload)
        if not paths:
            raise gr.Error("No checkpoint uploaded: upload a .zip of the folder save_pretrained() wrote.")
        UPLOAD_DIR.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="ckpt-", dir=UPLOAD_DIR))
        try:
            folder = extract_checkpoint(paths[0], dest)
            adapter = _load(f"The uploaded {paths[0].name}", folder)
        finally:  # the model, tokenizer and processor are in memory now: nothing of the upload stays on disk
            shutil.rmtree(dest, ignore_errors=True)
        return Target(paths[0].name, adapter, adapter.modality)
    if source != SOURCE_HUB:
        raise gr.Error(f"Unknown model source {source!r}; pick one of {[SOURCE_EXAMPLE, SOURCE_HUB, SOURCE_UPLOAD]}.")
    model_id = hub_id(model_id)
    from metashield_hf.targets.loading import resolve_folder

    try:  # a snapshot in the Hub cache: safetensors, JSON and tokenizer files only (no .bin, no .py)
        folder = resolve_folder(model_id)
    except (ValueError, OSError) as e:
        raise gr.Error(f"{model_id!r} could not be loaded from the Hub: {e}") from e
    _check_config_files(folder, model_id)
    adapter = _load(repr(model_id), folder)
    return Target(model_id, adapter, adapter.modality)


# ---- gathering samples --------------------------------------------------------------------------------------------
def _paths(files) -> list[Path]:
    # type="filepath" gives paths; older clients may send {"path": ...} dicts.
    return [Path(f["path"] if isinstance(f, dict) else f) for f in files or []]


def _open_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.copy()
    except OSError as e:
        raise gr.Error(f"Cannot read {path.name} as an image: {e}") from e


def _to_model_input(target: Target, image):
    """A PIL image as the model wants it (the digits CNN: an ``(1, 8, 8)`` tensor; other models: the image)."""
    return digits_image_to_tensor(image) if target.is_digits else _on_white(image)


def _on_white(image):
    """Transparent pixels (a sketch's untouched canvas) become white paper; other images are returned as they are."""
    if image.mode not in ("RGBA", "LA", "P"):
        return image
    from PIL import Image

    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _file_items(target: Target, files, what: str) -> tuple[list, list[str]]:
    """Items and their names from uploaded files (images for image models; text/CSV/JSONL files for text models)."""
    items, names = [], []
    for path in _paths(files):
        is_image = path.suffix.lower() in IMAGE_SUFFIXES
        if target.modality == "image":
            if not is_image:
                raise gr.Error(
                    f"{target.name} is an image model, but {path.name} is not an image: upload PNG/JPEG {what}."
                )
            items.append(_to_model_input(target, _open_image(path)))
            names.append(path.name)
        else:
            if is_image:
                raise gr.Error(f"{target.name} is a text model, but {path.name} is an image: upload {what} as text.")
            from metashield_hf.samples import load_samples

            try:
                texts = [t for t in load_samples(str(path)) if isinstance(t, str) and t.strip()]
            except (ValueError, OSError) as e:
                raise gr.Error(f"Cannot read {what} from {path.name}: {e}") from e
            items += texts
            names += [f"{path.name}:{i + 1}" for i in range(len(texts))]
    return items, names


def gather_clean(target: Target, typed: str | None, files, use_example: bool, n: int, minimum: int) -> list:
    """The clean samples from the form: the example's held-out pool, typed lines and/or uploaded files."""
    items: list = []
    if use_example:
        if target.example is None:
            raise gr.Error(
                "'Use the example's clean samples' needs a bundled example; type or upload clean samples instead."
            )
        items += list(target.example.clean_pool)
    typed_lines = _lines(typed)
    if typed_lines and target.modality == "image":
        raise gr.Error(
            f"{target.name} is an image model: typed text cannot be clean samples. Upload clean images instead."
        )
    items += typed_lines
    items += _file_items(target, files, "clean samples")[0]
    if not items:
        raise gr.Error(
            "No clean samples: type some (one per line), upload files, or tick 'Use the example's clean samples'."
        )
    if len(items) < minimum:
        raise gr.Error(f"Only {len(items)} clean samples; give at least {minimum} (10-50 recommended).")
    if len(items) > n:
        items = items[:n]
    return items


def _batch(target: Target, items: list):
    """Tensors of the digits CNN are stacked into one batch; other inputs stay a list."""
    return torch.stack(items) if target.is_digits else items


# ---- tab 1: scan a checkpoint -------------------------------------------------------------------------------------
COLUMN_NOTES = "**Columns of the per-class evidence table**\n\n" + "\n".join(
    f"- **{name}**: {note}" for name, note in COLUMNS.items()
)


def scan(
    source: str,
    example_key: str | None,
    model_id: str | None,
    upload,
    clean_text: str | None,
    clean_files,
    use_example_clean: bool,
    n_clean: float,
    steps: float,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker through this default
) -> tuple[str, str, str, str, str, pd.DataFrame, list[str]]:
    """Scan a checkpoint; returns (verdict, suspected target, summary, evidence chart PNG, every class's trigger
    picture stacked in one PNG, evidence table, [JSON report, HTML report])."""
    progress(0.05, desc="Loading the model")
    target = resolve_target(source, example_key, model_id, upload)
    clean = gather_clean(target, clean_text, clean_files, use_example_clean, int(n_clean), MIN_SCAN)
    k = target.num_classes()
    if k is not None and k < 3 and target.modality != "text":
        gr.Warning(
            f"{target.name} has {k} classes: the scan's anomaly index (a median over classes) cannot single out a "
            "target, so a binary model usually comes out 'clean'. The 'Check inputs' tab works for any model."
        )
    progress(0.2, desc=f"Synthesizing a trigger per class from {len(clean)} clean samples")
    try:
        report = metashield_hf.scan_model(target.model, _batch(target, clean), steps=int(steps), seed=0)
    except ValueError as e:
        raise gr.Error(f"The scan failed on {target.name}: {e}") from e
    progress(0.9, desc="Drawing the triggers and writing the report")
    if target.example is not None:
        report.checkpoint = f"bundled example {target.example.key}"
    out = REPORT_DIR / f"scan-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    texts = clean if target.modality == "text" else None
    pictures = render_report(report, texts, out)
    page = write_html_report(report, out, texts, pictures=pictures)
    table = pd.DataFrame(evidence_rows(report))
    summary = (
        f"### Verdict: **{report.verdict}**\n"
        f"Score **{report.score:.3f}** (threshold {report.threshold:.3f}); suspected target class "
        f"**{report.suspected_target_label}** ("
        + (
            f"anomaly index {report.anomaly_index:.2f}"
            if report.anomaly_index is not None
            else f"token trigger '{report.per_class[report.suspected_target].token_trigger}'"
        )
        + f"). {report.n_clean_samples} clean samples, trigger synthesis in {report.space} space, "
        f"{report.timings['total_s']:.1f} s."
    )
    if target.example is not None:
        ex = target.example
        truth = f"backdoored, target class {ex.target_label}" if ex.backdoored else "clean"
        summary += f"\n\nGround truth for this bundled example: **{truth}**. {ex.description}."
    label = report.suspected_target_label
    suspected = label if label == str(report.suspected_target) else f"{report.suspected_target}: {label}"
    files = [str(out / "report.json"), str(page)]
    shown = pictures.get("triggers", pictures["evidence"])  # a scan in embedding space alone has no trigger picture
    return report.verdict, suspected, summary, str(pictures["evidence"]), str(shown), table, files


# ---- tab 2: check inputs ------------------------------------------------------------------------------------------
def _sketch_image(sketch):
    """The sketchpad's drawing as a PIL image, or None when nothing was drawn."""
    if not sketch:
        return None
    img = sketch.get("composite") if isinstance(sketch, dict) else sketch
    layers = sketch.get("layers") if isinstance(sketch, dict) else None
    if img is None or (isinstance(sketch, dict) and not layers):
        return None
    if isinstance(img, (str, os.PathLike)):
        img = _open_image(Path(img))
    lo, hi = _on_white(img).convert("L").getextrema()
    return None if lo == hi else img


def _thumbnail(target: Target, item, size: int = 96):
    """A picture of a scored image input: the digits tensor upscaled, other images shrunk to ``size`` pixels."""
    if target.is_digits:
        return digits_tensor_to_image(item, scale=max(1, size // 8))
    image = _on_white(item).copy()
    image.thumbnail((size, size))
    return image


def check(
    source: str,
    example_key: str | None,
    model_id: str | None,
    upload,
    clean_text: str | None,
    clean_files,
    use_example_clean: bool,
    n_clean: float,
    target_fpr: float,
    test_text: str | None,
    test_files,
    sketch,
    n_example_tests: float,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker through this default
) -> tuple[str, pd.DataFrame, gr.BarPlot, list]:
    """Score test inputs against a threshold calibrated on the clean samples; returns (summary, table, histogram,
    the scored images with their scores: thumbnails for image models, empty for text models)."""
    progress(0.05, desc="Loading the model")
    target = resolve_target(source, example_key, model_id, upload)
    clean = gather_clean(target, clean_text, clean_files, use_example_clean, int(n_clean), MIN_CHECK)
    tests, sources = [], []
    n_ex = int(n_example_tests or 0)
    if n_ex > 0:
        if target.example is None:
            raise gr.Error("Held-out example inputs need a bundled example; set their number to 0 for other models.")
        held_clean, held_trig = list(target.example.test_clean[:n_ex]), list(target.example.test_triggered[:n_ex])
        tests += held_clean + held_trig
        sources += [f"held-out clean #{i + 1}" for i in range(len(held_clean))]
        sources += [f"held-out triggered #{i + 1}" for i in range(len(held_trig))]
    typed = _lines(test_text)
    if typed:
        if target.modality == "image":
            raise gr.Error(
                f"{target.name} is an image model: it cannot score text. Upload test images or draw one instead."
            )
        tests += typed
        sources += ["typed"] * len(typed)
    file_items, file_names = _file_items(target, test_files, "test inputs")
    tests += file_items
    sources += file_names
    drawing = _sketch_image(sketch)
    if drawing is not None:
        if target.modality != "image":
            raise gr.Error(f"{target.name} is a text model: type test inputs instead of drawing one.")
        tests.append(_to_model_input(target, drawing))
        sources.append("sketch")
    if not tests:
        what = "type them (one per line)" if target.modality == "text" else "upload images or draw one"
        raise gr.Error(f"No test inputs: {what}, or add held-out inputs of a bundled example.")
    progress(0.3, desc=f"Calibrating the threshold on {len(clean)} clean samples")
    try:
        shield = _detector().adapt(target.model, _batch(target, clean), target_fpr=float(target_fpr), seed=0)
        progress(0.7, desc=f"Scoring {len(tests)} inputs")
        results = shield.predict(_batch(target, tests))
    except ValueError as e:
        raise gr.Error(f"Scoring failed on {target.name}: {e}") from e
    rows = []
    for i, (item, origin, r) in enumerate(zip(tests, sources, results, strict=True)):
        # the input itself where it is text; images are shown as thumbnails, numbered as in this table
        shown = item if isinstance(item, str) else f"image #{i + 1}"
        rows.append(
            {
                "input": shown if len(shown) <= 120 else shown[:117] + "...",
                "source": origin,
                "score": round(r["score"], 4),
                "threshold": round(r["threshold"], 4),
                "flagged": r["label"] == "backdoored",
                "predicted class": r["predicted_class"],
            }
        )
    table = pd.DataFrame(rows)
    thumbs = [
        (_thumbnail(target, item), f"#{i + 1} {origin}: score {r['score']:.3f}" + (" FLAGGED" if flag else ""))
        for i, (item, origin, r, flag) in enumerate(zip(tests, sources, results, table["flagged"], strict=True))
        if not isinstance(item, str)
    ]
    hist = pd.DataFrame(
        [{"score": float(s), "count": 1, "group": "clean samples (leave-one-out)"} for s in shield.calibration_scores]
        + [{"score": r["score"], "count": 1, "group": "tested inputs"} for r in results]
    )
    flagged = int(table["flagged"].sum())
    summary = (
        f"### {flagged} of {len(results)} inputs flagged\n"
        f"Threshold **{shield.threshold:.3f}**, calibrated on {len(clean)} clean samples for a "
        f"{float(target_fpr):.0%} false-positive rate (leave-one-out, so the estimate is not optimistic)."
    )
    plot = gr.BarPlot(value=hist, title=f"Scores vs threshold {shield.threshold:.3f}")
    return summary, table, plot, thumbs


# ---- the interface ------------------------------------------------------------------------------------------------
def _target_inputs(prefix: str) -> tuple[gr.Radio, gr.Dropdown, gr.Textbox, gr.File]:
    choices = [(title, key) for key, (title, _, _) in BUNDLED_EXAMPLES.items()]
    source = gr.Radio(
        [SOURCE_EXAMPLE, SOURCE_HUB, SOURCE_UPLOAD], value=SOURCE_EXAMPLE, label="Model", elem_id=f"{prefix}-source"
    )
    example = gr.Dropdown(choices, value="digits-badnets", label="Bundled example", elem_id=f"{prefix}-example")
    model_id = gr.Textbox(label="Hub id", placeholder="org/name", elem_id=f"{prefix}-model-id")
    upload = gr.File(
        label="Checkpoint .zip (config.json + model.safetensors + tokenizer/processor files; no pickle, no code)",
        file_types=[".zip"],
        type="filepath",
        elem_id=f"{prefix}-upload",
    )
    return source, example, model_id, upload


def _clean_inputs(prefix: str) -> tuple[gr.Textbox, gr.File, gr.Checkbox]:
    use = gr.Checkbox(value=True, label="Use the example's clean samples (held-out data)", elem_id=f"{prefix}-use-ex")
    typed = gr.Textbox(lines=4, label="Clean samples, one per line (text models)", elem_id=f"{prefix}-clean-text")
    files = gr.File(
        file_count="multiple", label="Or upload clean samples (images, or a .txt/.csv/.jsonl file)", type="filepath"
    )
    return typed, files, use


def build_demo() -> gr.Blocks:
    """The two-tab Blocks app (not launched)."""
    with gr.Blocks(title="MetaShield: backdoor scanner") as demo:
        gr.Markdown(
            "# MetaShield\nFew-shot backdoor detection for Hugging Face classifiers: **scan** a checkpoint from a few "
            "clean samples (no triggered input needed), or **check** inputs for triggers against a threshold "
            "calibrated on clean samples.\n\n" + DOMAINS_NOTE
        )
        with gr.Tab("Scan a checkpoint", id="scan"):
            with gr.Row():
                with gr.Column():
                    source, example, model_id, upload = _target_inputs("scan")
                    clean_text, clean_files, use_ex = _clean_inputs("scan")
                    with gr.Accordion("Options", open=False):
                        n_clean = gr.Slider(MIN_SCAN, 50, value=20, step=1, label="Clean samples used")
                        steps = gr.Slider(10, 200, value=80, step=10, label="Trigger synthesis steps")
                    run = gr.Button("Scan", variant="primary", elem_id="scan-button")
                with gr.Column():
                    verdict = gr.Textbox(label="Verdict", elem_id="scan-verdict", interactive=False)
                    suspected = gr.Textbox(label="Suspected target class", elem_id="scan-target", interactive=False)
                    summary = gr.Markdown(elem_id="scan-summary")
                    chart = gr.Image(
                        label="Per-class evidence",
                        type="filepath",
                        elem_id="scan-chart",
                        show_label=False,
                        buttons=[],  # no icons over the title
                    )
            gr.Markdown("### Synthesized trigger of each class (suspected target first)")
            triggers = gr.Image(
                label="Synthesized trigger of each class",
                type="filepath",
                elem_id="scan-triggers",
                show_label=False,
                buttons=[],  # no icons over the title
            )
            gr.Markdown(
                "Images: the clean sample, the mask m (where the trigger is), the pattern p (what it writes), the "
                "trigger m·p alone and the patched sample (1-m)·x + m·p with the model's answer. Text: the token "
                "trigger inserted before clean sentences, where the search inserts it."
            )
            evidence = gr.Dataframe(label="Per-class evidence", elem_id="scan-evidence", interactive=False)
            gr.Markdown(COLUMN_NOTES, elem_id="scan-columns")
            report_files = gr.File(
                label="Report: JSON and a self-contained HTML page", file_count="multiple", elem_id="scan-report"
            )
            run.click(
                scan,
                [source, example, model_id, upload, clean_text, clean_files, use_ex, n_clean, steps],
                [verdict, suspected, summary, chart, triggers, evidence, report_files],
                api_name="scan",
            )
        with gr.Tab("Check inputs", id="check"):
            with gr.Row():
                with gr.Column():
                    c_source, c_example, c_model_id, c_upload = _target_inputs("check")
                    c_clean_text, c_clean_files, c_use_ex = _clean_inputs("check")
                    c_n_clean = gr.Slider(MIN_CHECK, 100, value=100, step=1, label="Clean samples used (calibration)")
                    fpr = gr.Slider(0.01, 0.5, value=0.05, step=0.01, label="Target false-positive rate")
                with gr.Column():
                    test_text = gr.Textbox(
                        lines=4, label="Test inputs, one per line (text models)", elem_id="test-text"
                    )
                    test_files = gr.File(file_count="multiple", label="Test images (image models)", type="filepath")
                    sketch = gr.Sketchpad(
                        label="Or draw a test image (image models)", type="pil", height=280, canvas_size=(256, 256)
                    )
                    n_ex_tests = gr.Slider(
                        0, 20, value=5, step=1, label="Add this many held-out clean + triggered inputs of the example"
                    )
                    c_run = gr.Button("Check", variant="primary", elem_id="check-button")
            c_summary = gr.Markdown(elem_id="check-summary")
            with gr.Row():
                c_table = gr.Dataframe(label="Scores", elem_id="check-table", interactive=False)
                c_hist = gr.BarPlot(
                    x="score",
                    y="count",
                    color="group",
                    x_bin=0.05,
                    y_aggregate="sum",
                    title="Scores vs threshold",
                    color_map={"clean samples (leave-one-out)": "#1f77b4", "tested inputs": "#ff7f0e"},
                    elem_id="check-hist",
                )
            c_inputs = gr.Gallery(
                label="The image inputs scored (numbered as in the table)",
                columns=10,
                height=240,
                object_fit="contain",
                elem_id="check-inputs",
            )
            c_run.click(
                check,
                [
                    c_source,
                    c_example,
                    c_model_id,
                    c_upload,
                    c_clean_text,
                    c_clean_files,
                    c_use_ex,
                    c_n_clean,
                    fpr,
                    test_text,
                    test_files,
                    sketch,
                    n_ex_tests,
                ],
                [c_summary, c_table, c_hist, c_inputs],
                api_name="check",
            )
    return demo


def launch_kwargs(host: str | None = None, port: int | None = None) -> dict:
    """``launch()`` settings: 127.0.0.1 unless told otherwise (Spaces set GRADIO_SERVER_NAME=0.0.0.0)."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    port = port or int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860)
    return {
        "server_name": host,
        "server_port": port,
        "show_error": True,  # gr.Error messages reach the browser and API clients
        "footer_links": ["api", "gradio"],
        "theme": gr.themes.Soft(),
    }


def main(argv: list[str] | None = None) -> int:
    """``python app.py [--host H] [--port P]``: build and serve the app (blocks until interrupted)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860; $PORT or $GRADIO_SERVER_PORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_demo().queue(default_concurrency_limit=1).launch(**launch_kwargs(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
