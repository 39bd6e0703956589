"""The Gradio Space (spaces/metashield/app.py): both tabs through the API, error messages, the refusals that keep a
public Space safe (server paths, unsafe zips, pickle, remote code), and a real browser.

The app is launched in-process on 127.0.0.1 (a free port) once per module. The bundled examples are trained once and
cached (about a minute per digits model, 15 s per SST-2 model); afterwards the whole file takes well under a minute.
The browser test drives headless Chromium (/usr/bin/chromium) with Playwright and writes screenshots of the scan (with
the trigger pictures) and of the check tab to ``spaces/metashield/screenshots/``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("gradio")

pytestmark = [pytest.mark.space, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "spaces" / "metashield" / "app.py"
SCREENSHOTS = REPO / "spaces" / "metashield" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# (source, example, model id, checkpoint zip, clean text, clean files, use the example's clean samples, n clean, steps)
SCAN_EXAMPLE = ("Bundled example", "{key}", "", None, "", [], True, 20, 60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_app():
    spec = importlib.util.spec_from_file_location("metashield_space_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def space_url():
    """The app served on 127.0.0.1 at a free port for this module (torch on one thread: tiny models, busy box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = _load_app()
    demo = app.build_demo().queue()
    kwargs = app.launch_kwargs(host="127.0.0.1", port=_free_port())
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, **kwargs)
    yield url
    demo.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(space_url):
    from gradio_client import Client

    return Client(space_url, verbose=False)


def _scan(client, key: str):
    return client.predict(*[a.format(key=key) if isinstance(a, str) else a for a in SCAN_EXAMPLE], api_name="/scan")


def test_launch_binds_localhost_by_default(space_url, monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    app = sys.modules["metashield_space_app"]
    assert app.launch_kwargs()["server_name"] == "127.0.0.1" and app.launch_kwargs()["server_port"] == 7860
    monkeypatch.setenv("PORT", "8123")
    assert app.launch_kwargs()["server_port"] == 8123
    assert space_url.startswith("http://127.0.0.1:")


def test_scan_flags_the_backdoored_digits_example(client):
    verdict, target, summary, chart, triggers, evidence, files = _scan(client, "digits-badnets")
    assert verdict == "backdoored"
    assert target == "0"  # the BadNets target class (the digits model's labels are its class indices)
    assert "Ground truth for this bundled example: **backdoored, target class 0**" in summary
    assert Path(chart).read_bytes()[:4] == b"\x89PNG"  # the evidence chart, drawn by scan/pictures.py
    from PIL import Image

    with Image.open(triggers) as stacked, Image.open(chart) as evidence_chart:  # one row per class's trigger picture
        assert stacked.height > 9 * stacked.width / 5 and evidence_chart.width > 300
    assert len(evidence["data"]) == 10 and "anomaly index" in evidence["headers"]
    report_file, page = sorted(files, key=lambda f: Path(f).suffix != ".json")
    report = json.loads(Path(report_file).read_text())
    assert report["verdict"] == "backdoored" and report["suspected_target"] == 0 and len(report["per_class"]) == 10
    assert Path(page).read_text().count("data:image/png;base64,") == 11  # the HTML report embeds its pictures


def test_scan_passes_the_clean_digits_example(client):
    verdict, _, summary, _, _, _, files = _scan(client, "digits-clean")
    assert verdict == "clean"
    assert "Ground truth for this bundled example: **clean**" in summary
    report_file = next(f for f in files if f.endswith(".json"))
    assert json.loads(Path(report_file).read_text())["verdict"] == "clean"


def test_scan_gives_a_verdict_on_the_federated_example(client):
    verdict, target, summary, _, triggers, evidence, _ = _scan(client, "fl-digits-badnets")
    assert verdict in ("clean", "backdoored") and target.isdigit()  # the scan may miss it: the app says so
    assert "Ground truth for this bundled example: **backdoored, target class 0**" in summary
    assert len(evidence["data"]) == 10 and Path(triggers).stat().st_size > 1_000


def test_check_scores_triggered_digits_above_clean_ones(client, tmp_path):
    from gradio_client import handle_file

    from metashield_hf.zoo.examples import digits_tensor_to_image, load_bundled_example

    ex = load_bundled_example("digits-badnets")
    files = []
    for kind, batch in (("triggered", ex.test_triggered), ("clean", ex.test_clean)):
        for i in range(8):
            path = tmp_path / f"{kind}-{i}.png"
            digits_tensor_to_image(batch[i]).save(path)
            files.append(handle_file(str(path)))
    summary, table, hist, scored = client.predict(
        "Bundled example", "digits-badnets", "", None, "", [], True, 100, 0.05, "", files, None, 0, api_name="/check"
    )
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    triggered = [r for r in rows if r["source"].startswith("triggered")]
    clean = [r for r in rows if r["source"].startswith("clean")]
    # the scored inputs are shown: a thumbnail per image, numbered as in the table, with its score
    assert [r["input"] for r in rows] == [f"image #{i + 1}" for i in range(16)]
    assert len(scored) == 16 and scored[0]["caption"].startswith("#1 triggered-0.png: score ")
    assert len(triggered) == len(clean) == 8
    # A population check: the detector does not flag every triggered digit (its TPR on this example is below 1),
    # but triggered inputs score higher, some are flagged, and clean ones stay under the threshold.
    assert sum(r["score"] for r in triggered) / 8 > sum(r["score"] for r in clean) / 8
    n_flagged = sum(bool(r["flagged"]) for r in rows)
    assert any(r["flagged"] for r in triggered) and sum(bool(r["flagged"]) for r in clean) <= 1
    assert all(r["predicted class"] == 0 for r in triggered)  # the trigger works on the model
    assert f"{n_flagged} of 16 inputs flagged" in summary
    assert hist["title"].endswith(f"threshold {rows[0]['threshold']:.3f}")
    groups = [row[2] for row in hist["value"]["data"]]
    assert groups.count("clean samples (leave-one-out)") == 100 and groups.count("tested inputs") == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Hub id", None, "  ", None, "", [], True, 20, 60), "The Hub id field is empty"),
        (
            ("Hub id", None, "no-such-org/no-such-model", None, "x", [], False, 20, 60),
            "could not be loaded from the Hub",
        ),
        (("Upload a checkpoint (.zip)", None, "", None, "x", [], False, 20, 60), "No checkpoint uploaded"),
        (("Bundled example", "digits-badnets", "", None, "a\nb\nc\nd\ne", [], False, 20, 60), "is an image model"),
        (("Bundled example", "digits-badnets", "", None, "", [], False, 20, 60), "No clean samples"),
    ],
    ids=["empty-model", "unknown-hub-id", "no-upload", "text-for-image-model", "no-clean-samples"],
)
def test_scan_bad_input_says_what_to_fix(client, tmp_path, args, message):
    from gradio_client.exceptions import AppError

    args = tuple(a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args)
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/scan")


@pytest.mark.parametrize("model_id", ["/etc", "../x", "/etc/passwd", "~/.ssh", "a/b/c", "./org", "org/name"])
def test_server_paths_are_refused(client, tmp_path, monkeypatch, model_id):
    """A public Space reads no path on its server: anything but org/name is refused, and so is an org/name that
    exists on the server's disk (here a folder under the working directory), before anything is read."""
    from gradio_client.exceptions import AppError

    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for api, args in (
        ("/scan", ("Hub id", None, model_id, None, "", [], True, 20, 60)),
        ("/check", ("Hub id", None, model_id, None, "", [], True, 20, 0.05, "", [], None, 0)),
    ):
        with pytest.raises(AppError, match=r"is not a Hub id: give org/name|never from its own disk") as err:
            client.predict(*args, api_name=api)
        assert "config.json" not in str(err.value)  # nothing about the disk comes back


def _zip(path: Path, entries: dict) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            if isinstance(data, zipfile.ZipInfo):
                z.writestr(data, b"/etc/passwd")
            else:
                z.writestr(zipfile.ZipInfo(name), data)
    return path


def _symlink(name: str):
    import zipfile

    info = zipfile.ZipInfo(name)
    info.external_attr = 0o120777 << 16  # a symbolic link to /etc/passwd
    return info


CONFIG = json.dumps({"model_type": "bert", "num_labels": 2}).encode()
REMOTE = json.dumps({"model_type": "evil", "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}).encode()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"config.json": CONFIG, "model.safetensors": b"x", "../evil.json": b"{}"}, "is a '..' path"),
        ({"config.json": CONFIG, "model.safetensors": b"x", "ok/../../evil.json": b"{}"}, "is a '..' path"),
        ({"config.json": CONFIG, "model.safetensors": b"x", "/etc/cron.d/evil": b"x"}, "is an absolute"),
        ({"config.json": CONFIG, "model.safetensors": b"x", "vocab.txt": _symlink("vocab.txt")}, "a link"),
        ({"ckpt/config.json": CONFIG, "ckpt/pytorch_model.bin": b"\x80\x02pickle"}, "only has pickle weights"),
        ({"config.json": REMOTE, "model.safetensors": b"x", "modeling_evil.py": b"import os"}, "asks for remote code"),
        ({"config.json": CONFIG}, "has no model.safetensors"),
        ({"model.safetensors": b"x"}, "has no config.json"),
        (None, "is not a .zip file"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "pickle-only",
        "remote-code",
        "no-weights",
        "no-config",
        "not-a-zip",
    ],  # fmt: skip
)
def test_unsafe_checkpoint_zips_are_refused(client, tmp_path, entries, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    upload = tmp_path / "checkpoint.zip"
    if entries is None:
        upload.write_bytes(b"not a zip at all")
    else:
        _zip(upload, entries)
    with pytest.raises(AppError, match=message):
        client.predict(
            "Upload a checkpoint (.zip)", None, "", handle_file(str(upload)), "a\nb\nc\nd\ne", [], False, 20, 10,
            api_name="/scan",
        )  # fmt: skip
    assert not (tmp_path / "evil.json").exists() and not any(Path("/tmp").glob("evil.json"))


def test_uploaded_checkpoint_zip_is_scanned(client, tmp_path):
    """A zip of a folder that save_pretrained wrote (a tiny transformers image classifier) scans like a bundled one."""
    import shutil

    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    from builders import NUM_LABELS, build_image_model

    model, processor = build_image_model("resnet")
    folder = tmp_path / "my-classifier"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    upload = shutil.make_archive(str(tmp_path / "my-classifier"), "zip", tmp_path, "my-classifier")
    rng = np.random.default_rng(0)
    images = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append(handle_file(str(tmp_path / f"{i}.png")))
    verdict, _, summary, chart, triggers, evidence, _ = client.predict(
        "Upload a checkpoint (.zip)", None, "", handle_file(upload), "", images, False, 20, 10, api_name="/scan"
    )
    assert verdict in ("clean", "backdoored") and "6 clean samples" in summary
    assert len(evidence["data"]) == NUM_LABELS and Path(chart).stat().st_size > 5_000
    assert Path(triggers).stat().st_size > 5_000


def test_check_refuses_text_for_an_image_model(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="is an image model: it cannot score text"):
        client.predict(
            "Bundled example",
            "digits-badnets",
            "",
            None,
            "",
            [],
            True,
            20,
            0.05,
            "a sentence",
            [],
            None,
            0,
            api_name="/check",
        )


def _wait_for_verdict(page, timeout: int = 120_000) -> str:
    page.wait_for_function(
        "() => { const e = document.querySelector('#scan-verdict textarea, #scan-verdict input');"
        " return e && e.value.length > 0; }",
        timeout=timeout,
    )
    return page.locator("#scan-verdict textarea, #scan-verdict input").first.input_value()


def _wait_for_pictures(page, src_before: str | None = None) -> str:
    """The evidence chart and the trigger pictures are loaded (gradio marks images lazy: made eager here, so the
    full-page screenshot has them) and, after a second scan, are the new ones; returns the triggers' URL."""
    page.locator("#scan-triggers img").first.wait_for(timeout=60_000)
    page.wait_for_function(
        "before => { const imgs = [...document.querySelectorAll('#scan-triggers img, #scan-chart img')];"
        " imgs.forEach(i => { i.loading = 'eager'; });"
        " const t = document.querySelector('#scan-triggers img');"
        " return imgs.length == 2 && t.src !== before && imgs.every(i => i.complete && i.naturalWidth > 0); }",
        arg=src_before,
        timeout=60_000,
    )
    page.wait_for_timeout(500)
    return page.locator("#scan-triggers img").first.get_attribute("src")


def test_browser_scan_shows_the_trigger_pictures(space_url):
    """Headless Chromium: scan the bundled backdoored digits and text examples from the page, see the verdict, the
    evidence chart and each class's trigger picture, and screenshot them; then the check tab with its scored inputs."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install it with `apt-get install chromium` to run the browser test")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(space_url, wait_until="domcontentloaded")
            page.locator("#scan-button").click(timeout=60_000)  # defaults: the bundled backdoored digits example
            assert _wait_for_verdict(page) == "backdoored"
            assert "Verdict: backdoored" in page.locator("#scan-summary").inner_text()
            digits_triggers = _wait_for_pictures(page)
            columns = page.locator("#scan-columns").inner_text()
            assert all(name in columns for name in ("trigger size", "flip rate", "anomaly index", "detector score"))
            page.screenshot(path=str(SCREENSHOTS / "scan.png"), full_page=True)
            page.locator("#scan-triggers").scroll_into_view_if_needed()
            page.locator("#scan-triggers").screenshot(path=str(SCREENSHOTS / "scan_triggers.png"))

            if _has_sst2():  # the text example: the token trigger in context
                page.locator("#scan-example input").first.click()
                page.get_by_role("option", name="SST-2 tiny BERT with a rare-word trigger 'cf'").click()
                page.locator("#scan-button").click()
                # the verdict may not change (both examples are backdoored): wait for the text scan's own table
                page.locator("#scan-evidence").get_by_text("token trigger").wait_for(timeout=240_000)
                assert "rare-word trigger" in page.locator("#scan-summary").inner_text()
                _wait_for_pictures(page, digits_triggers)
                page.screenshot(path=str(SCREENSHOTS / "scan_text.png"), full_page=True)

            page.get_by_role("tab", name="Check inputs").click()
            page.locator("#check-button").click()
            page.get_by_text("inputs flagged").wait_for(timeout=90_000)
            page.locator("#check-hist canvas, #check-hist svg").first.wait_for(timeout=30_000)
            page.locator("#check-inputs img").nth(9).wait_for(timeout=30_000)  # the 10 scored digits, as thumbnails
            page.wait_for_function(
                "() => [...document.querySelectorAll('#check-inputs img')].every(i => { i.loading = 'eager';"
                " return i.complete && i.naturalWidth > 0; })",
                timeout=30_000,
            )
            page.wait_for_timeout(1000)
            # the default example set is 5 triggered + 5 held-out clean digits; the detector flags some, not all
            flagged = re.search(r"(\d+) of 10 inputs flagged", page.locator("#check-summary").inner_text())
            assert flagged and 1 <= int(flagged.group(1)) <= 10
            assert "held-out triggered #1" in page.locator("#check-inputs").inner_text()
            page.screenshot(path=str(SCREENSHOTS / "check.png"), full_page=True)
        finally:
            browser.close()


def _has_sst2() -> bool:
    from metashield_hf.zoo.build import resolve_data_root

    return (resolve_data_root() / "sst2" / "train.csv").exists()
