"""The Gradio Space (spaces/metashield/app.py): both tabs through the API, error messages, and a real browser.

The app is launched in-process on 127.0.0.1 (a free port) once per module. The bundled examples are trained once and
cached (about a minute per digits model, 15 s per SST-2 model); afterwards the whole file takes well under a minute.
The browser test drives headless Chromium (/usr/bin/chromium) with Playwright and writes a screenshot of each tab to
``spaces/metashield/screenshots/``.
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
# (source, example, model id, clean text, clean files, use the example's clean samples, n clean, steps)
SCAN_EXAMPLE = ("Bundled example", "{key}", "", "", [], True, 20, 60)


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
    verdict, target, summary, bars, evidence, report_file = _scan(client, "digits-badnets")
    assert verdict == "backdoored"
    assert target == "0"  # the BadNets target class (the digits model's labels are its class indices)
    assert "Ground truth for this bundled example: **backdoored, target class 0**" in summary
    assert [row[0] for row in bars["data"]] == [str(k) for k in range(10)]  # one bar per class
    assert len(evidence["data"]) == 10
    report = json.loads(Path(report_file).read_text())
    assert report["verdict"] == "backdoored" and report["suspected_target"] == 0 and len(report["per_class"]) == 10


def test_scan_passes_the_clean_digits_example(client):
    verdict, _, summary, _, _, report_file = _scan(client, "digits-clean")
    assert verdict == "clean"
    assert "Ground truth for this bundled example: **clean**" in summary
    assert json.loads(Path(report_file).read_text())["verdict"] == "clean"


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
    summary, table, hist = client.predict(
        "Bundled example", "digits-badnets", "", "", [], True, 100, 0.05, "", files, None, 0, api_name="/check"
    )
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    triggered = [r for r in rows if r[table["headers"][0]].startswith("triggered")]
    clean = [r for r in rows if r[table["headers"][0]].startswith("clean")]
    assert len(triggered) == len(clean) == 8
    # A population check: the detector does not flag every triggered digit (its TPR on this example is below 1),
    # but triggered inputs score higher, some are flagged, and clean ones stay under the threshold.
    assert sum(r["score"] for r in triggered) / 8 > sum(r["score"] for r in clean) / 8
    n_flagged = sum(bool(r["flagged"]) for r in rows)
    assert any(r["flagged"] for r in triggered) and sum(bool(r["flagged"]) for r in clean) <= 1
    assert all(r["predicted class"] == 0 for r in triggered)  # the trigger works on the model
    assert f"{n_flagged} of 16 inputs flagged" in summary
    assert hist["title"].endswith(f"(threshold {rows[0]['threshold']:.3f})")
    groups = [row[2] for row in hist["value"]["data"]]
    assert groups.count("clean samples (leave-one-out)") == 100 and groups.count("tested inputs") == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Hub id or local folder", None, "  ", "", [], True, 20, 60), "The model field is empty"),
        (("Hub id or local folder", None, "{tmp}", "x", [], False, 20, 60), "is not a model MetaShield can load"),
        (("Bundled example", "digits-badnets", "", "a\nb\nc\nd\ne", [], False, 20, 60), "is an image model"),
        (("Bundled example", "digits-badnets", "", "", [], False, 20, 60), "No clean samples"),
    ],
    ids=["empty-model", "folder-not-a-model", "text-for-image-model", "no-clean-samples"],
)
def test_scan_bad_input_says_what_to_fix(client, tmp_path, args, message):
    from gradio_client.exceptions import AppError

    args = tuple(a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args)
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/scan")


def test_check_refuses_text_for_an_image_model(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="is an image model: it cannot score text"):
        client.predict(
            "Bundled example",
            "digits-badnets",
            "",
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


def test_browser_scan_shows_the_verdict(space_url):
    """Headless Chromium: scan the bundled backdoored example from the page, read the verdict, screenshot both tabs."""
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
            verdict = page.locator("#scan-verdict textarea, #scan-verdict input").first
            page.wait_for_function(
                "() => { const e = document.querySelector('#scan-verdict textarea, #scan-verdict input');"
                " return e && e.value.length > 0; }",
                timeout=90_000,
            )
            assert verdict.input_value() == "backdoored"
            assert "Verdict: backdoored" in page.locator("#scan-summary").inner_text()
            page.locator("#scan-bars canvas, #scan-bars svg").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)  # let the chart finish drawing
            page.screenshot(path=str(SCREENSHOTS / "scan.png"), full_page=True)

            page.get_by_role("tab", name="Check inputs").click()
            page.locator("#check-button").click()
            page.get_by_text("inputs flagged").wait_for(timeout=90_000)
            page.locator("#check-hist canvas, #check-hist svg").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            # the default example set is 5 triggered + 5 held-out clean digits; the detector flags some, not all
            flagged = re.search(r"(\d+) of 10 inputs flagged", page.locator("#check-summary").inner_text())
            assert flagged and 1 <= int(flagged.group(1)) <= 10
            page.screenshot(path=str(SCREENSHOTS / "check.png"), full_page=True)
        finally:
            browser.close()
