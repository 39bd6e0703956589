"""Pictures of a scan: each class's synthesized trigger and the per-class evidence chart, as PNGs and one HTML page.

A verdict is easier to trust when the trigger behind it can be seen. For image models each class gets its mask, its
pattern and a clean sample patched with them (``x' = (1 - m) * x + m * p``, what the model was shown); for text models
its token trigger inserted where the search inserts it, right before a clean sentence. The evidence chart shows how
easily each class can be forced, the suspected target in red.

[`render_report`] writes the PNGs, [`write_html_report`] a self-contained ``index.html`` (pictures embedded as base64)
with the evidence table and a one-line explanation of each column ([`COLUMNS`]). ``metashield scan --report DIR`` and
the Space call these same functions. matplotlib is imported on first use, and only its object API (``Figure`` and
the Agg canvas): no pyplot, so a caller's backend and global figure state are left alone.
"""

from __future__ import annotations

import base64
import html
import logging
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import ClassEvidence, ScanReport

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "class_strength",
    "evidence_rows",
    "gallery",
    "render_report",
    "strength_name",
    "trigger_html",
    "write_html_report",
]

#: One line per column of the evidence table (the Space, the HTML page and ``metashield scan`` share these names).
COLUMNS: dict[str, str] = {
    "class": "The class index, as the model numbers its outputs.",
    "label": "The class name from the model's config (id2label), or the index where it has none.",
    "token trigger": "Text models: the few tokens that, inserted before a clean sentence, force this class most.",
    "trigger size": "Fraction of the input the smallest synthesized trigger covers (mask mean); small = easy to force.",
    "reached": "Whether that trigger flipped at least the flip threshold of the clean samples to this class.",
    "flip rate": "Fraction of the clean samples (not already of this class) that the trigger sends to this class.",
    "anomaly index": "How far this class's trigger size lies below the median of all classes, in robust standard "
    "deviations (MAD); large = an outlier, a likely backdoor target (Neural Cleanse flags above 2).",
    "token class prob.": "Text models: the class's mean probability with its token trigger inserted; near 1 = forced.",
    "detector score": "Mean input-level detector score of clean samples carrying this class's trigger; high = they "
    "look like triggered inputs to the detector.",
}

MAX_TEXT_SAMPLES = 3  # sentences shown with each class's token trigger
TEXT_WIDTH = 90  # characters of a sentence shown in a text picture


# ---- the numbers behind the pictures ------------------------------------------------------------------------------
def class_strength(c: ClassEvidence) -> float:
    """How easily a class is forced: its anomaly index, or for a text scan by the token search alone (which has no
    anomaly index) the mean class probability under its best token trigger."""
    if c.anomaly_index is not None:
        return c.anomaly_index
    return c.token_target_probs[-1] if c.token_target_probs else 0.0


def strength_name(report: ScanReport) -> str:
    """What [`class_strength`] measures in this report (the evidence chart's y axis)."""
    if report.per_class and report.per_class[0].anomaly_index is not None:
        return "anomaly index"
    return "class probability under its token trigger"


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def evidence_rows(report: ScanReport) -> list[dict[str, Any]]:
    """The evidence table, one row per class, with the columns of [`COLUMNS`] that this report fills."""
    tokens = any(c.token_trigger is not None for c in report.per_class)
    probs = any(c.token_target_probs for c in report.per_class)
    rows = []
    for c in report.per_class:
        row: dict[str, Any] = {"class": c.class_index, "label": c.label}
        if tokens:
            row["token trigger"] = c.token_trigger
        row |= {
            "trigger size": _r(c.trigger_size, 4),
            "reached": c.reached,
            "flip rate": round(c.flip_rate, 3),
            "anomaly index": _r(c.anomaly_index, 3),
        }
        if probs:
            row["token class prob."] = _r(c.token_target_probs[-1] if c.token_target_probs else None, 3)
        row["detector score"] = _r(c.detector_score, 3)
        rows.append(row)
    return rows


def _class_name(c: ClassEvidence) -> str:
    return f"{c.class_index}" if c.label == str(c.class_index) else f"{c.class_index}: {c.label}"


def _shown_classes(report: ScanReport, max_classes: int) -> list[int]:
    """The suspected target first, then the classes easiest to force, at most ``max_classes`` of them."""
    order = sorted(range(len(report.per_class)), key=lambda k: -class_strength(report.per_class[k]))
    order.remove(report.suspected_target)
    return [report.suspected_target, *order[: max(0, max_classes - 1)]]


def _title(c: ClassEvidence, report: ScanReport) -> str:
    parts = [f"class {_class_name(c)}"]
    if c.trigger_size is not None:
        parts.append(f"trigger size {c.trigger_size:.3f}")
    parts.append(f"flips {c.flip_rate:.0%} of the clean samples")
    if c.anomaly_index is not None:
        parts.append(f"anomaly index {c.anomaly_index:.2f}")
    elif c.token_target_probs:
        parts.append(f"class prob. {c.token_target_probs[-1]:.2f}")
    if c.class_index == report.suspected_target:
        parts.append("SUSPECTED TARGET")
    return ", ".join(parts)


# ---- drawing ------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, without pyplot (no global state, safe in a server's threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", bbox_inches="tight", pad_inches=0.15)  # tight: no title or label is cut
    return path


def _to_image(x, low, high):
    """A ``(C, H, W)`` tensor as an ``(H, W)`` or ``(H, W, 3)`` array in [0, 1], scaled by the clean range."""
    import numpy as np

    arr = ((x - low) / (high - low).clamp_min(1e-8)).clamp(0, 1).numpy()
    if arr.shape[0] == 1:
        return arr[0]
    arr = np.moveaxis(arr[:3], 0, -1)
    return arr if arr.shape[-1] == 3 else np.concatenate([arr, arr[..., :1]], -1)[..., :3]


def _image_pictures(report: ScanReport, inputs, classes: list[int], out: Path) -> dict[str, Path]:
    """One PNG per class: clean sample, mask, pattern, patched sample (pixel-space synthesis)."""
    syn = report.synthesis
    patterns = syn.patterns.detach().float().cpu()
    k_all = patterns.shape[0]
    patterns = patterns.reshape(k_all, *patterns.shape[-3:])  # (K, C, H, W)
    masks = syn.masks.detach().float().cpu().reshape(k_all, *patterns.shape[-2:])  # one mask for all channels
    x = None if inputs is None else inputs.detach().float().cpu()
    if x is not None and tuple(x.shape[1:]) != tuple(patterns.shape[1:]):
        logger.warning(
            "clean inputs of shape %s do not match the trigger's %s; no patched samples drawn", x.shape, patterns.shape
        )
        x = None
    ref = x if x is not None else patterns
    dims = [0, 2, 3]
    low, high = ref.amin(dim=dims, keepdim=True)[0], ref.amax(dim=dims, keepdim=True)[0]
    gray = patterns.shape[1] == 1
    pred = syn.logits.argmax(-1) if syn.logits is not None else None  # (K, N): the model on the patched samples
    written = {}
    for k in classes:
        c = report.per_class[k]
        panels = []
        i = 0
        if x is not None:
            if pred is not None:  # a sample the trigger actually flips, where there is one
                hits = (pred[k] == k).nonzero().flatten()
                i = int(hits[0]) if len(hits) else 0
            panels.append(("clean sample", _to_image(x[i], low, high), None))
        panels.append(("mask m (white = trigger)", masks[k].numpy(), "gray"))
        panels.append(("pattern p", _to_image(patterns[k], low, high), "gray" if gray else None))
        panels.append(("trigger m·p", _to_image(masks[k] * patterns[k] + (1 - masks[k]) * low, low, high), None))
        if x is not None:
            patched = (1 - masks[k]) * x[i] + masks[k] * patterns[k]
            said = f"model says {_class_name(report.per_class[int(pred[k, i])])}" if pred is not None else ""
            panels.append((f"patched (1-m)x + m p\n{said}", _to_image(patched, low, high), None))
        fig = _figure(2.3 * len(panels), 2.9)
        for j, (name, img, cmap) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), j + 1)
            kw = {"cmap": cmap or ("gray" if img.ndim == 2 else None), "vmin": 0, "vmax": 1}
            ax.imshow(img, interpolation="nearest", **kw)
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("\n".join(textwrap.wrap(_title(c, report), 70)), fontsize=10, color=_color(k, report))
        written[f"trigger_{k}"] = _save(fig, out / f"trigger_class{k}.png")
    return written


def _color(k: int, report: ScanReport) -> str:
    return "#b2182b" if k == report.suspected_target else "#333333"


def _sentences(clean_samples) -> list[str]:
    texts = [t for t in (clean_samples or []) if isinstance(t, str) and t.strip()]
    return texts[:MAX_TEXT_SAMPLES] or ["(a clean sentence)"]


def _short(text: str, width: int = TEXT_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _text_pictures(report: ScanReport, clean_samples, classes: list[int], out: Path) -> dict[str, Path]:
    """One PNG per class: the token trigger (highlighted) inserted before a few clean sentences."""
    sentences = [_short(s) for s in _sentences(clean_samples)]
    written = {}
    for k in classes:
        c = report.per_class[k]
        if c.token_trigger is None:
            continue
        fig = _figure(9.0, 0.45 + 0.3 * len(sentences))
        fig.suptitle("\n".join(textwrap.wrap(_title(c, report), 90)), fontsize=10, color=_color(k, report))
        renderer = fig.canvas.get_renderer()
        for j, sentence in enumerate(sentences):
            y = 0.85 * (1 - (j + 0.5) / len(sentences))  # rows below the title
            t = fig.text(
                0.02, y, c.token_trigger, fontsize=11, fontweight="bold", color="white", va="center",
                bbox={"facecolor": "#b2182b", "edgecolor": "none", "boxstyle": "round,pad=0.25"},
            )  # fmt: skip
            box = t.get_window_extent(renderer).transformed(fig.transFigure.inverted())
            fig.text(box.x1 + 0.012, y, sentence, fontsize=11, va="center", color="#222222")
        written[f"trigger_{k}"] = _save(fig, out / f"trigger_class{k}.png")
    return written


def _evidence_chart(report: ScanReport, out: Path) -> Path:
    """Bar chart of [`class_strength`] per class, the suspected target in red, the full title wrapped."""
    values = [class_strength(c) for c in report.per_class]
    names = [_class_name(c) if len(_class_name(c)) <= 14 else _class_name(c)[:13] + "…" for c in report.per_class]
    k = len(values)
    fig = _figure(min(max(6.0, 0.45 * k + 2), 16.0), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(
        range(k), values, color=[_color(i, report) if i == report.suspected_target else "#8c8c8c" for i in range(k)]
    )
    ax.set_xticks(range(k))
    ax.set_xticklabels(
        names, rotation=0 if k <= 12 and max(map(len, names)) <= 6 else 45, ha="right" if k > 12 else "center"
    )
    ax.set_xlabel("class")
    ax.set_ylabel(strength_name(report))
    ax.axhline(0, color="#444444", linewidth=0.6)
    title = (
        f"Per-class evidence: how easily each class can be forced ({strength_name(report)}; suspected target "
        f"{report.suspected_target_label} in red). Verdict: {report.verdict}, score {report.score:.3f} "
        f"(threshold {report.threshold:.3f})."
    )
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    return _save(fig, out / "evidence.png")


def render_report(
    report: ScanReport,
    clean_samples=None,
    out_dir: str | Path = "metashield-report",
    *,
    max_classes: int = 10,
) -> dict[str, Path]:
    """Write the scan's pictures as PNGs: the evidence chart and one trigger picture per class.

    Args:
        report: a [`ScanReport`] of [`scan_model`] (image scans read ``report.synthesis``: masks, patterns and the
            clean inputs in pixel space; text scans read each class's token trigger).
        clean_samples: text models: clean sentences to show each token trigger in (default: a placeholder); image
            models: an ``(N, C, H, W)`` tensor of preprocessed clean inputs, only for a report whose synthesis does not
            hold its inputs.
        out_dir: the folder to write into (created).
        max_classes: at most this many classes get a trigger picture: the suspected target, then the classes easiest
            to force (a 1000-class model needs no 1000 pictures).

    Returns:
        ``{name: path}``: ``"evidence"`` first, then ``"trigger_<k>"`` per class, the suspected target first, and
        ``"triggers"``, those pictures stacked into one (where there are any).

    Example:
        ```python
        >>> report = scan_model(model, clean_images[:20])
        >>> pictures = render_report(report, out_dir="report")
        >>> list(pictures)[:2]
        ['evidence', 'trigger_0']
        ```
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"evidence": _evidence_chart(report, out)}
    classes = _shown_classes(report, max_classes)
    syn = report.synthesis
    if syn is not None and syn.kind == "pixels":
        inputs = syn.inputs
        if inputs is None and clean_samples is not None and hasattr(clean_samples, "dim"):
            inputs = clean_samples
        written |= _image_pictures(report, inputs, classes, out)
    elif any(c.token_trigger is not None for c in report.per_class):
        written |= _text_pictures(report, clean_samples, classes, out)
    else:
        logger.info("no trigger pictures for a scan in the %s space (nothing a picture can show)", report.space)
    per_class = [path for name, path in written.items() if name.startswith("trigger_")]
    if per_class:
        written["triggers"] = _stack(per_class, out / "triggers.png")
    return written


def _stack(paths: list[Path], out: Path) -> Path:
    """The per-class pictures one under the other, on white: one picture of every trigger, for a page or a Space."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height
    canvas.save(out)
    return out


def gallery(report: ScanReport, pictures: dict[str, Path]) -> list[tuple[str, str]]:
    """``(path, caption)`` of each trigger picture, for a gallery (the Space's)."""
    return [
        (str(path), _title(report.per_class[int(name.split("_")[1])], report))
        for name, path in pictures.items()
        if name.startswith("trigger_")
    ]


def trigger_html(report: ScanReport, clean_samples=None, max_classes: int = 10) -> str:
    """Text scans: each class's token trigger highlighted before clean sentences, as an HTML fragment."""
    sentences = _sentences(clean_samples)
    parts = []
    for k in _shown_classes(report, max_classes):
        c = report.per_class[k]
        if c.token_trigger is None:
            continue
        mark = f'<mark style="background:#b2182b;color:#fff;padding:0 .2em">{html.escape(c.token_trigger)}</mark>'
        lines = "".join(f"<li>{mark} {html.escape(_short(s))}</li>" for s in sentences)
        parts.append(f"<p><b>{html.escape(_title(c, report))}</b></p><ul>{lines}</ul>")
    return "\n".join(parts)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _cell(v) -> str:
    return "–" if v is None else html.escape(str(v))


def write_html_report(
    report: ScanReport,
    out_dir: str | Path,
    clean_samples=None,
    *,
    pictures: dict[str, Path] | None = None,
    max_classes: int = 10,
) -> Path:
    """Write ``index.html`` (self-contained: the pictures are embedded), ``report.json`` and the PNGs to ``out_dir``.

    Args:
        report: the [`ScanReport`].
        out_dir: the folder (created).
        clean_samples: as in [`render_report`].
        pictures: pictures already written by [`render_report`] (default: written here).
        max_classes: as in [`render_report`].

    Returns:
        The path of ``index.html``.

    Example:
        ```python
        >>> page = write_html_report(scan_model(model, clean_images[:20]), "report")
        >>> page.name
        'index.html'
        ```
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pictures is None:
        pictures = render_report(report, clean_samples, out, max_classes=max_classes)
    (out / "report.json").write_text(report.to_json())
    rows = evidence_rows(report)
    header = list(rows[0]) if rows else []
    table = (
        "<table><thead><tr>"
        + "".join(f'<th title="{html.escape(COLUMNS.get(h, ""))}">{html.escape(h)}</th>' for h in header)
        + "</tr></thead><tbody>"
        + "".join(
            f"<tr{' class=target' if r['class'] == report.suspected_target else ''}>"
            + "".join(f"<td>{_cell(r[h])}</td>" for h in header)
            + "</tr>"
            for r in rows
        )
        + "</tbody></table>"
    )
    notes = "".join(f"<li><b>{html.escape(h)}</b>: {html.escape(COLUMNS[h])}</li>" for h in header if h in COLUMNS)
    triggers = "".join(
        f"<figure>{_img(path, name)}<figcaption>{html.escape(caption)}</figcaption></figure>"
        for (path, caption), name in zip(
            gallery(report, pictures), [n for n in pictures if n.startswith("trigger_")], strict=True
        )
    )
    snippet = trigger_html(report, clean_samples, max_classes) if report.space in ("tokens", "embeddings") else ""
    anomaly = "–" if report.anomaly_index is None else f"{report.anomaly_index:.2f}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MetaShield scan of {html.escape(report.checkpoint)}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
tr.target{{background:#fde0dd}} figure{{margin:1em 0}} figcaption{{font-size:.9em;color:#555}}
.verdict-backdoored{{color:#b2182b}} .verdict-clean{{color:#1a9641}}
</style></head><body>
<h1>MetaShield scan: <span class="verdict-{html.escape(report.verdict)}">{html.escape(report.verdict)}</span></h1>
<p>Model <code>{html.escape(report.checkpoint)}</code>: score <b>{report.score:.3f}</b> (threshold
{report.threshold:.3f}); suspected target class <b>{html.escape(report.suspected_target_label)}</b> (anomaly index
{anomaly}); {report.n_clean_samples} clean samples; triggers synthesized in the {html.escape(report.space)} space in
{report.timings.get("total_s", 0.0):.1f} s. The verdict comes from the model-level head over all signals; the pictures
show the evidence behind it.</p>
<h2>Per-class evidence</h2>
{_img(pictures["evidence"], "per-class evidence chart")}
{table}
<h3>Columns</h3><ul>{notes}</ul>
<h2>Synthesized triggers</h2>
<p>For each class, the smallest trigger found that forces the clean samples into it. A backdoor's target needs a much
smaller trigger than the other classes; a trigger that looks like a natural feature of the class (a stroke of the
digit, a sentiment word) is no evidence of a backdoor.</p>
{triggers}
{snippet}
<p><small>Full numbers: <a href="report.json">report.json</a>.</small></p>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
