"""Pictures of a scan (scan/pictures.py): PNGs and the HTML page for a real digits scan and a real tiny text-model
scan, and ``metashield scan --report DIR`` end to end."""

from __future__ import annotations

import re

import pytest

from builders import NUM_LABELS, build_text_model
from metashield_hf.scan import scan_model
from metashield_hf.scan.pictures import COLUMNS, evidence_rows, gallery, render_report, write_html_report

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "the film was a quiet delight from start to end",
    "a dull and tired story with nothing new",
    "every scene felt honest and warm",
    "the plot drags and the jokes fall flat",
    "a bold and moving piece of work",
    "i left before the ending",
]


@pytest.fixture(scope="module")
def digits_report(digits_models):
    backdoored, _ = digits_models
    return scan_model(backdoored.model, backdoored.clean_pool[:20], steps=40, seed=0, progress=False)


@pytest.fixture(scope="module")
def text_report(wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer), seed=0)
    return scan_model(model, SENTENCES, processor=wordpiece_tokenizer, steps=5, seed=0, progress=False)


def _pngs(pictures: dict) -> None:
    for path in pictures.values():
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, path  # a real picture, not an empty canvas


def test_digits_scan_pictures_show_each_class_trigger(digits_report, tmp_path):
    report = digits_report
    pictures = render_report(report, out_dir=tmp_path)
    assert list(pictures)[:2] == ["evidence", f"trigger_{report.suspected_target}"]  # the suspect first
    assert set(pictures) == {"evidence", "triggers", *(f"trigger_{k}" for k in range(10))}
    _pngs(pictures)
    # the synthesis keeps its clean inputs in pixel space, so the patched sample needs no second preprocessing
    assert report.synthesis.inputs.shape == (20, 1, 8, 8)
    captions = [caption for _, caption in gallery(report, pictures)]
    assert len(captions) == 10 and captions[0].endswith("SUSPECTED TARGET")
    assert sum("SUSPECTED TARGET" in c for c in captions) == 1


def test_at_most_max_classes_get_a_picture(digits_report, tmp_path):
    pictures = render_report(digits_report, out_dir=tmp_path, max_classes=3)
    assert len([n for n in pictures if n.startswith("trigger_")]) == 3


def test_html_page_embeds_the_pictures_and_explains_every_column(digits_report, tmp_path):
    page = write_html_report(digits_report, tmp_path)
    text = page.read_text()
    assert page.name == "index.html" and (tmp_path / "report.json").exists()
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 1 + 10  # chart + one per class: self-contained
    for column in evidence_rows(digits_report)[0]:
        assert f"<b>{column}</b>: {COLUMNS[column]}" in text.replace("&#x27;", "'")
    assert "Verdict" not in text or "backdoored" in text


def test_text_scan_pictures_put_the_token_trigger_in_context(text_report, tmp_path):
    report = text_report
    assert all(c.token_trigger for c in report.per_class)
    pictures = render_report(report, SENTENCES, tmp_path)
    assert set(pictures) == {"evidence", "triggers", *(f"trigger_{k}" for k in range(NUM_LABELS))}
    _pngs(pictures)
    page = write_html_report(report, tmp_path / "html", SENTENCES, pictures=pictures).read_text()
    assert page.count("data:image/png;base64,") == 1 + NUM_LABELS
    trigger = report.per_class[report.suspected_target].token_trigger
    assert f">{trigger}</mark> {SENTENCES[0]}</li>" in page  # the trigger where the search inserts it
    assert "token trigger" in evidence_rows(report)[0] and "<b>token class prob.</b>" in page


def test_cli_scan_report_writes_the_page(tmp_path, capsys):
    """``metashield scan CHECKPOINT --report DIR`` on a tiny transformers image classifier saved to a folder."""
    import json

    import numpy as np
    from PIL import Image

    from builders import build_image_model
    from metashield_hf.cli import main

    model, processor = build_image_model("resnet")
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = tmp_path / "clean"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "report"
    argv = ["scan", str(folder), "--clean-samples", str(images), "--steps", "5", "--blend_steps", "0",
            "--report", str(out), "--no_progress", "--json"]  # fmt: skip
    assert main(argv) in (0, 1)
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_dir"] == str(out)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + NUM_LABELS  # the chart and each class's trigger
    assert (out / "evidence.png").stat().st_size > 5_000 and json.loads((out / "report.json").read_text())["verdict"]
    _pngs({k: out / f"trigger_class{k}.png" for k in range(NUM_LABELS)})
