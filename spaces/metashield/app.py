"""MetaShield Space: scan a classifier for a backdoor, or check inputs to it for triggers (Gradio Blocks).

Run locally with ``python spaces/metashield/app.py [--port 7860] [--host 127.0.0.1]``. On a Hugging Face Space the
same file is the ``app_file``: Spaces set ``GRADIO_SERVER_NAME=0.0.0.0`` and the port, which are honoured here.

Two tabs, each also an API endpoint (``gradio_client.Client(url).predict(..., api_name=...)``):

- ``/scan``: model-level scan ([`metashield_hf.scan_model`]) from a few clean samples, no triggered input needed.
- ``/check``: input-level detection ([`MetaShieldDetector.adapt`]) with a threshold calibrated on the clean samples.

Everything runs offline on a CPU with the embedded detector and the bundled example checkpoints
([`metashield_hf.zoo.examples.load_bundled_example`], trained once and cached).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
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

from metashield_hf.zoo.examples import (
    BUNDLED_EXAMPLES,
    BundledExample,
    digits_image_to_tensor,
    load_bundled_example,
)

__all__ = ["build_demo", "check", "launch_kwargs", "main", "scan"]

logger = logging.getLogger("metashield_space")

SOURCE_EXAMPLE = "Bundled example"
SOURCE_HUB = "Hub id or local folder"
MIN_SCAN, MIN_CHECK = 5, 5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
REPORT_DIR = Path(tempfile.gettempdir()) / "metashield-space"
DOMAINS_NOTE = (
    "**Bundled examples** (trained here on first use, then cached): vision — a tiny CNN on scikit-learn's 8×8 digits, "
    "one with a BadNets corner patch (target class 0) and its clean twin; text — a tiny BERT on a few hundred SST-2 "
    "phrases, one with the rare-word trigger `cf` (target *positive*) and its clean twin. **No federated-learning "
    "example is bundled**: an FL global model is scanned like any other classifier (give its Hub id or folder)."
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
        """The bundled digits CNNs take ``(1, 8, 8)`` tensors, so pictures are converted for them."""
        return self.example is not None and self.example.domain == "cv"

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


def resolve_target(source: str, example_key: str | None, model_id: str | None) -> Target:
    """The target from the form, or a gr.Error that says what to fix."""
    if source == SOURCE_EXAMPLE:
        if not example_key:
            raise gr.Error("Pick a bundled example, or choose 'Hub id or local folder' and give one.")
        if example_key not in BUNDLED_EXAMPLES:
            raise gr.Error(f"Unknown bundled example {example_key!r}; pick one of {sorted(BUNDLED_EXAMPLES)}.")
        try:
            ex = _example(example_key)
        except FileNotFoundError as e:  # the SST-2 pair needs its training data
            raise gr.Error(f"The example {example_key!r} cannot be built here: {e}") from e
        return Target(ex.title, ex.model, ex.modality, ex)
    model_id = (model_id or "").strip()
    if not model_id:
        raise gr.Error("The model field is empty: give a Hub id (org/name) or a local checkpoint folder.")
    try:
        adapter = metashield_hf.load_target(model_id)
    except FileNotFoundError as e:
        raise gr.Error(f"No such folder: {model_id!r}. Check the path, or give a Hub id (org/name).") from e
    except (ValueError, OSError, TypeError) as e:
        raise gr.Error(f"{model_id!r} is not a model MetaShield can load: {e}") from e
    if adapter.modality not in ("image", "text"):
        raise gr.Error(f"{model_id!r} loaded as a {adapter.modality} model; this Space handles text and image models.")
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
def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _strength(c) -> float:
    """How easily a class is forced: its anomaly index, or for a text scan by token search alone (no anomaly index)
    the mean class probability under its best token trigger."""
    return c.anomaly_index if c.anomaly_index is not None else c.token_target_probs[-1]


def _evidence_frames(report) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [
        {
            "class": f"{c.class_index}" if c.label == str(c.class_index) else f"{c.class_index}: {c.label}",
            "strength": round(_strength(c), 3),
            "role": "suspected target" if c.class_index == report.suspected_target else "other classes",
        }
        for c in report.per_class
    ]
    table = pd.DataFrame(
        [
            {
                "class": c.class_index,
                "label": c.label,
                **({"token trigger": c.token_trigger} if c.token_trigger is not None else {}),
                "trigger size": _round(c.trigger_size, 4),
                "reached": c.reached,
                "flip rate": round(c.flip_rate, 3),
                "anomaly index": _round(c.anomaly_index, 3),
                **({"token class prob.": round(c.token_target_probs[-1], 3)} if c.token_target_probs else {}),
                "detector score": _round(c.detector_score, 3),
            }
            for c in report.per_class
        ]
    )
    return pd.DataFrame(rows), table


def scan(
    source: str,
    example_key: str | None,
    model_id: str | None,
    clean_text: str | None,
    clean_files,
    use_example_clean: bool,
    n_clean: float,
    steps: float,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects the tracker through this default
) -> tuple[str, str, str, pd.DataFrame, pd.DataFrame, str]:
    """Scan a checkpoint; returns (verdict, suspected target, summary, bar-chart data, evidence table, JSON file)."""
    progress(0.05, desc="Loading the model")
    target = resolve_target(source, example_key, model_id)
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
    progress(0.9, desc="Writing the report")
    if target.example is not None:
        report.checkpoint = f"bundled example {target.example.key}"
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    report_file = REPORT_DIR / f"metashield-scan-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    report_file.write_text(report.to_json())
    bars, table = _evidence_frames(report)
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
    return report.verdict, suspected, summary, bars, table, str(report_file)


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


def check(
    source: str,
    example_key: str | None,
    model_id: str | None,
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
) -> tuple[str, pd.DataFrame, gr.BarPlot]:
    """Score test inputs against a threshold calibrated on the clean samples; returns (summary, table, histogram)."""
    progress(0.05, desc="Loading the model")
    target = resolve_target(source, example_key, model_id)
    clean = gather_clean(target, clean_text, clean_files, use_example_clean, int(n_clean), MIN_CHECK)
    tests, names = [], []
    n_ex = int(n_example_tests or 0)
    if n_ex > 0:
        if target.example is None:
            raise gr.Error("Held-out example inputs need a bundled example; set their number to 0 for other models.")
        tests += list(target.example.test_clean[:n_ex]) + list(target.example.test_triggered[:n_ex])
        names += [f"example clean #{i + 1}" for i in range(n_ex)] + [
            f"example triggered #{i + 1}" for i in range(n_ex)
        ]
    typed = _lines(test_text)
    if typed:
        if target.modality == "image":
            raise gr.Error(
                f"{target.name} is an image model: it cannot score text. Upload test images or draw one instead."
            )
        tests += typed
        names += typed
    file_items, file_names = _file_items(target, test_files, "test inputs")
    tests += file_items
    names += file_names
    drawing = _sketch_image(sketch)
    if drawing is not None:
        if target.modality != "image":
            raise gr.Error(f"{target.name} is a text model: type test inputs instead of drawing one.")
        tests.append(_to_model_input(target, drawing))
        names.append("sketch")
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
    table = pd.DataFrame(
        [
            {
                "input": name if len(name) <= 80 else name[:77] + "...",
                "score": round(r["score"], 4),
                "threshold": round(r["threshold"], 4),
                "flagged": r["label"] == "backdoored",
                "predicted class": r["predicted_class"],
            }
            for name, r in zip(names, results, strict=True)
        ]
    )
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
    plot = gr.BarPlot(value=hist, title=f"Scores: clean samples vs tested inputs (threshold {shield.threshold:.3f})")
    return summary, table, plot


# ---- the interface ------------------------------------------------------------------------------------------------
def _target_inputs(prefix: str) -> tuple[gr.Radio, gr.Dropdown, gr.Textbox]:
    choices = [(title, key) for key, (title, _, _) in BUNDLED_EXAMPLES.items()]
    source = gr.Radio([SOURCE_EXAMPLE, SOURCE_HUB], value=SOURCE_EXAMPLE, label="Model", elem_id=f"{prefix}-source")
    example = gr.Dropdown(choices, value="digits-badnets", label="Bundled example", elem_id=f"{prefix}-example")
    model_id = gr.Textbox(
        label="Hub id or local folder", placeholder="org/name or /path/to/checkpoint", elem_id=f"{prefix}-model-id"
    )
    return source, example, model_id


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
                    source, example, model_id = _target_inputs("scan")
                    clean_text, clean_files, use_ex = _clean_inputs("scan")
                    with gr.Accordion("Options", open=False):
                        n_clean = gr.Slider(MIN_SCAN, 50, value=20, step=1, label="Clean samples used")
                        steps = gr.Slider(10, 200, value=80, step=10, label="Trigger synthesis steps")
                    run = gr.Button("Scan", variant="primary", elem_id="scan-button")
                with gr.Column():
                    verdict = gr.Textbox(label="Verdict", elem_id="scan-verdict", interactive=False)
                    suspected = gr.Textbox(label="Suspected target class", elem_id="scan-target", interactive=False)
                    summary = gr.Markdown(elem_id="scan-summary")
                    bars = gr.BarPlot(
                        x="class",
                        y="strength",
                        color="role",
                        title="Per-class evidence: how easily each class can be forced (images: anomaly index; "
                        "text: class probability under its best token trigger)",
                        color_map={"suspected target": "#d62728", "other classes": "#7f7f7f"},
                        elem_id="scan-bars",
                    )
            evidence = gr.Dataframe(label="Per-class evidence", elem_id="scan-evidence", interactive=False)
            report_file = gr.File(label="JSON report", elem_id="scan-report")
            run.click(
                scan,
                [source, example, model_id, clean_text, clean_files, use_ex, n_clean, steps],
                [verdict, suspected, summary, bars, evidence, report_file],
                api_name="scan",
            )
        with gr.Tab("Check inputs", id="check"):
            with gr.Row():
                with gr.Column():
                    c_source, c_example, c_model_id = _target_inputs("check")
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
                    title="Scores: clean samples vs tested inputs",
                    color_map={"clean samples (leave-one-out)": "#1f77b4", "tested inputs": "#ff7f0e"},
                    elem_id="check-hist",
                )
            c_run.click(
                check,
                [
                    c_source,
                    c_example,
                    c_model_id,
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
                [c_summary, c_table, c_hist],
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
