"""`device=` on the scan, adapt and the CLI (issue #31, item 7), on CPU: an explicit device runs, a bad one is a
one-line error (exit 2 on the CLI), and a model object is never moved unless asked."""

from __future__ import annotations

import pytest
import torch

from builders import SENTENCES, build_text_model
from metashield_hf.cli import main
from metashield_hf.scan import neural_cleanse_scan, scan_model
from metashield_hf.targets import load_target, resolve_device, target_device

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = {"steps": 2, "n": 8, "use_detector": False, "progress": False}


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory, wordpiece_tokenizer):
    folder = tmp_path_factory.mktemp("device") / "bert"
    build_text_model("bert", len(wordpiece_tokenizer)).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "clean.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


def test_resolve_device_default_and_errors():
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu'; use one of cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available on this machine"):
            resolve_device("cuda")


def test_a_path_goes_to_the_default_device_a_model_object_stays(bert_folder, wordpiece_tokenizer):
    assert target_device(str(bert_folder)) == resolve_device(None)
    model = build_text_model("bert", len(wordpiece_tokenizer))
    assert target_device(model) is None and target_device(model, "cpu") == torch.device("cpu")
    adapter = load_target(model, wordpiece_tokenizer, device="cpu")
    with pytest.raises(ValueError, match="runs on cpu, not meta|device 'meta' is not supported"):
        load_target(adapter, device="meta")


def test_scan_runs_on_the_device_asked_for(bert_folder):
    report = scan_model(str(bert_folder), SENTENCES, device="cpu", **CHEAP)
    assert report.options["device"] == "cpu" and report.verdict in ("clean", "backdoored")
    assert neural_cleanse_scan(str(bert_folder), SENTENCES, n=8, steps=2, device="cpu").verdict in (
        "clean",
        "backdoored",
    )
    for bad, message in (("gpu", "unknown device 'gpu'"), ("meta", "device 'meta' is not supported")):
        with pytest.raises(ValueError, match=message):
            scan_model(str(bert_folder), SENTENCES, device=bad, **CHEAP)


def test_adapt_and_pipeline_take_a_device(bert_folder):
    from metashield_hf import load_detector
    from metashield_hf.shield import adapt

    detector = load_detector(one_pass=True)
    shield = adapt(detector, str(bert_folder), SENTENCES, steps=0, device="cpu", erase="off")
    assert shield.target.device == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        adapt(detector, str(bert_folder), SENTENCES, steps=0, device="tpu0")
    from metashield_hf.pipeline_backdoor_detection import BackdoorDetectionPipeline

    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        BackdoorDetectionPipeline(
            model=detector, target_model=str(bert_folder), clean_samples=SENTENCES, target_device="meta"
        )


def test_cli_device_flag(bert_folder, clean_file, capsys):
    base = [str(bert_folder), "--clean_samples", str(clean_file), "--steps", "2", "--n", "8", "--no_progress"]
    assert main(["scan", *base, "--device", "cpu", "--use_detector", "false", "--json"]) in (0, 1)
    assert '"device": "cpu"' in capsys.readouterr().out
    for bad in ("gpu", "meta"):
        assert main(["scan", *base, "--device", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"'{bad}'" in err and err.startswith("metashield scan: error:")
    detect = ["detect", "--target", str(bert_folder), "--clean_samples", str(clean_file), "--inputs", str(clean_file)]
    assert main([*detect, "--device", "gpu", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown device 'gpu'" in err and len(err.splitlines()) == 1
