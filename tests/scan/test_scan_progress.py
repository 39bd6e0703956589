"""Progress of a scan: a tqdm bar per stage on stderr when asked (and none when not), and the cost estimate logged
before the synthesis starts."""

from __future__ import annotations

import logging

import pytest

from builders import build_text_model
from metashield_hf.arguments import parse_args
from metashield_hf.cli import DetectArguments, ScanArguments
from metashield_hf.scan import ScanConfig, scan_model
from metashield_hf.scan.progress import log_scan_cost
from test_pipeline import clean_sentences

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = {"steps": 3, "blend_steps": 0, "seed": 0}  # the bars and the log, not detection quality


def test_image_scan_shows_the_synthesis_and_detector_bars_only_when_asked(digits_models, capsys, caplog):
    backdoored, _ = digits_models
    clean = backdoored.clean_pool[:8]
    caplog.set_level(logging.DEBUG, logger="metashield_hf.scan.progress")
    scan_model(backdoored.model, clean, progress=True, **CHEAP)
    err = capsys.readouterr().err
    # ten classes optimised in one batch (class_batch 16): one bar over their 3 steps, then the detector's
    assert "synthesis classes 1-10/10" in err and "3/3" in err
    assert "detector: score triggered set 1/1" in err
    # the estimate names its factors, their product and the options that cut it: 10 classes x 3 steps x 8 samples
    (line,) = [r.getMessage() for r in caplog.records if "sample passes" in r.getMessage()]
    assert "10 classes x 3 steps x 8 clean samples = 240 sample passes" in line
    assert all(flag in line for flag in ("--steps", "--n", "--refine"))

    scan_model(backdoored.model, clean, progress=False, **CHEAP)
    assert "synthesis" not in capsys.readouterr().err
    scan_model(backdoored.model, clean, **CHEAP)  # default: tqdm shows bars on a terminal only; capsys is none
    assert "synthesis" not in capsys.readouterr().err


def test_text_scan_shows_the_token_search_bar(wordpiece_tokenizer, capsys):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    scan_model(model, clean_sentences(8, 0), processor=wordpiece_tokenizer, progress=True, **CHEAP)
    err = capsys.readouterr().err
    assert "token search" in err and "detector" in err


def test_cost_estimate_counts_refine_and_blend_and_speaks_up_for_long_scans(caplog):
    caplog.set_level(logging.DEBUG, logger="metashield_hf.scan.progress")
    # 10 classes x 80 steps, plus the default 20 blend steps of an image scan, on 20 samples: 20 * (800 + 200)
    log_scan_cost("m", "image", ScanConfig(), 10, 20, forward_s=0.1, tokens=False)
    # screen and refine: 10 classes x 40 screen steps + 2 refined classes x 40 more; text: no blend
    log_scan_cost("m", "text", ScanConfig(refine=2, blend_steps=0), 10, 20, forward_s=0.001, tokens=True)
    long, short = caplog.records
    assert "= 20000 sample passes, about 300 s" in long.getMessage() and long.levelno == logging.INFO
    assert "--blend_steps 0" in long.getMessage()
    assert "= 9600 sample passes" in short.getMessage() and short.levelno == logging.DEBUG
    assert "before the token search" in short.getMessage() and "blend" not in short.getMessage()


def test_cli_shows_progress_unless_told_not_to():
    assert parse_args(ScanArguments, ["ckpt"]).scan_config().progress is True
    assert parse_args(ScanArguments, ["ckpt", "--no_progress"]).scan_config().progress is False
    assert parse_args(DetectArguments, []).progress is True
    assert parse_args(DetectArguments, ["--no_progress"]).progress is False
