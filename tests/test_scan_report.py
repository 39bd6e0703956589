"""The committed scan report and shipped scan head come from the committed scan records: `scripts/scan_benchmark.py
--report_only` rebuilds them from the records alone, on a machine without the zoo."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from metashield_hf.scan_head import DEFAULT_SCAN_HEAD, ScanHead

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "reports" / "scan.md"


def _script(name: str):
    """The module of ``scripts/NAME.py`` (the scripts import ``scan_benchmark`` by name, so scripts/ joins the path)."""
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed_command() -> list[str]:
    """The report's own reproduce command (the one that shipped the head), as arguments."""
    match = re.search(r"```bash\npython scripts/scan_benchmark\.py (.+)\n```", REPORT.read_text())
    assert match, "reports/scan.md has no reproduce command"
    return match.group(1).split()


def _option(args: list[str], name: str) -> list[str]:
    i = args.index(name)
    values = []
    for a in args[i + 1 :]:
        if a.startswith("--"):
            break
        values.append(a)
    return values


@pytest.mark.filterwarnings("ignore")
def test_report_only_without_the_zoo_refits_the_shipped_head(tmp_path, monkeypatch):
    args = _committed_command()
    assert "--ship" in args
    shutil.copyfile(REPO / "reports" / "scan.jsonl", tmp_path / "scan.jsonl")
    shutil.copyfile(REPO / "reports" / "scan.prior_head.json", tmp_path / "scan.prior_head.json")
    replace = {
        "--zoo": [str(tmp_path / "no_zoo_here")],
        "--split": [str(tmp_path / "no_split_here.json")],
        "--out": [str(tmp_path / "scan")],
        "--reuse_nc": [],  # only the scans read it
        "--ship": [],  # never overwrite the shipped head from a test
    }
    argv, i = [], 0
    while i < len(args):
        name = args[i]
        n = len(_option(args, name)) if name.startswith("--") else 0
        if name in replace:
            argv += [name, *replace[name]] if replace[name] else []
        else:
            argv += args[i : i + 1 + n]  # paths relative to the repository root, the working directory below
        i += 1 + n
    head_out = tmp_path / "head.json"
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["scan_benchmark.py", *argv, "--head_out", str(head_out), "--report_only"])
    benchmark = _script("scan_benchmark")
    benchmark.main()

    fitted, shipped = ScanHead.load(head_out), ScanHead.load(DEFAULT_SCAN_HEAD)
    assert fitted.weights == pytest.approx(shipped.weights, abs=1e-6)
    assert fitted.bias == pytest.approx(shipped.bias, abs=1e-6)
    for key, part in shipped.by_modality.items():
        if key in ("image/blend", "image/source"):  # fit by scripts/scan_blend.py (the next test); carried over
            continue
        assert fitted.by_modality[key]["weights"] == pytest.approx(part["weights"], abs=1e-6), key

    # the report's held-out AUROC per domain is the shipped head's over the held-out records (their signals
    # refreshed by the current library, as the report does)
    summary = json.loads((tmp_path / "scan.json").read_text())
    assert "without the zoo" in summary["meta"]["split"]
    test = [r for r in summary["records"] if r["split"] == "test"]
    # the image rows are rescans with the blend synthesis, scan_model's default (--rescans), not the older scans
    assert {benchmark.variant(r) for r in test if r["domain"] in ("cv", "fl")} == {"blend"}
    for domain in ("cv", "fl", "nlp"):
        rows = [r for r in test if r["domain"] == domain]
        y = [int(r["is_backdoored"]) for r in rows]
        s = [benchmark.score(shipped, r) for r in rows]
        assert np.isfinite(s).all()
        reported = summary["groups"][domain]["MetaShield scan (fitted head)"]["auroc"]
        assert reported == pytest.approx(roc_auc_score(y, s)), domain
        # the verdict compares each score with the threshold of the part that made it, as scan_model's does
        hits = [(v > benchmark.verdict_threshold(shipped, r)) == bool(t) for v, r, t in zip(s, rows, y, strict=True)]
        assert summary["groups"][domain]["MetaShield scan (fitted head)"]["accuracy"] == pytest.approx(np.mean(hits))
        auc, low, high = summary["intervals"][domain]["MetaShield scan (fitted head)"]
        assert auc == pytest.approx(reported) and low <= reported <= high and high - low > 0, domain
        # and the committed report says the same
        line = next(ln for ln in REPORT.read_text().splitlines() if ln.startswith(f"| {domain} (") and "fitted" in ln)
        assert float(line.split("|")[3]) == pytest.approx(reported, abs=5e-4), domain


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("part", ["blend", "source"])
def test_scan_blend_refits_the_shipped_variant_part(part, tmp_path, monkeypatch):
    """``scripts/scan_blend.py`` (``--part blend`` / ``--part source``) refits the shipped ``image/PART`` part from
    the committed records, by its report's own command."""
    report = REPO / "reports" / f"scan_{part}.md"
    if not report.exists():
        pytest.skip(f"no {report.name}")
    match = re.search(r"reproduce: `python scripts/scan_blend\.py (.+?)`", report.read_text())
    assert match, f"{report.name} has no reproduce command"
    args = [a for a in match.group(1).split() if a != "--ship"]
    i = args.index("--out")
    args[i + 1] = str(tmp_path / part)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["scan_blend.py", *args])
    _script("scan_blend").main()

    fitted = ScanHead.load(tmp_path / f"{part}.head.json").by_modality[f"image/{part}"]
    shipped = ScanHead.load(DEFAULT_SCAN_HEAD).by_modality[f"image/{part}"]
    assert fitted["weights"] == pytest.approx(shipped["weights"], abs=1e-6)
    assert fitted["bias"] == pytest.approx(shipped["bias"], abs=1e-6)
    # the verdict threshold flags 5% of the train clean models by cross-validation: above the 0.5 of a calibrated
    # probability, since these parts are fit on more backdoored than clean models
    assert fitted["threshold"] == pytest.approx(shipped["threshold"], abs=1e-6)
    assert 0.5 < fitted["threshold"] < 1.0
    # and the rest of the head is the shipped one, untouched
    assert ScanHead.load(tmp_path / f"{part}.head.json").weights == ScanHead.load(DEFAULT_SCAN_HEAD).weights


def test_fpr_thresholds_flag_the_asked_share_of_clean_train_models():
    """``scan_benchmark.py --target_fpr``: each part's threshold flags that share of the clean train models it
    scores, by their out-of-fold scores; the image head and the text part each get their own."""
    benchmark = _script("scan_benchmark")
    rng = np.random.default_rng(0)
    records = []
    for i in range(160):
        bd = i % 2 == 1
        text = i % 4 >= 2
        shift = 1.0 if bd else 0.0
        if text:
            signals = {"token_logit_2": rng.normal(shift), "token_detector": rng.normal(shift)}
        else:
            signals = {s: rng.normal(shift) for s in benchmark.SYNTHESIS_SIGNALS}
        records.append({"domain": "nlp" if text else "cv", "is_backdoored": bd, "metashield": {"signals": signals}})
    text_signals = ("token_logit_2", "token_detector")
    head = benchmark.fit_heads(records, 1.0, text_signals)
    runs = benchmark.out_of_fold_scores(records, 1.0, text_signals, repeats=4)
    thresholds = benchmark.set_fpr_thresholds(head, records, runs, 0.1)
    assert set(thresholds) == {"image", "text"} and thresholds["image"] != thresholds["text"]
    assert head.threshold == thresholds["image"] and head.by_modality["text"]["threshold"] == thresholds["text"]
    for key, text in (("image", False), ("text", True)):
        clean = np.array([not r["is_backdoored"] and (r["domain"] == "nlp") == text for r in records])
        flagged = np.mean([(scores[clean] > thresholds[key]).mean() for scores in runs])
        assert flagged == pytest.approx(0.1, abs=0.02), key
