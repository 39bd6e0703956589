"""`metashield detect` in-process: the bundled example, a user's folder and samples, and exit code 2 on bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from builders import build_text_model
from metashield_hf.cli import main
from test_pipeline import clean_sentences, far_sentences


def test_detect_bundled_example_json(capsys):
    assert main(["detect", "--json", "--n", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_attack_success_rate"] >= 0.9 and out["model_clean_accuracy"] >= 0.85
    assert out["n_clean_samples"] == 20 and out["held_out_clean"]["n"] > 100 and out["triggered"]["n"] > 100
    assert 0.0 <= out["fpr"] <= 1.0 and 0.0 <= out["tpr"] <= 1.0
    # triggered inputs must score above held-out clean ones on average (AUROC measured over ~1200 inputs)
    assert out["auroc"] > 0.6 and out["triggered"]["mean_score"] > out["held_out_clean"]["mean_score"]


def test_detect_table_output(capsys):
    assert main(["detect"]) == 0
    text = capsys.readouterr().out
    assert "held-out clean" in text and "triggered" in text and "AUROC" in text


def test_detect_user_folder_with_text_files(tmp_path, wordpiece_tokenizer, capsys):
    folder = tmp_path / "clf"
    build_text_model("bert", len(wordpiece_tokenizer)).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    (tmp_path / "clean.txt").write_text("\n".join(clean_sentences(12, 0)))
    (tmp_path / "check.txt").write_text("\n".join(clean_sentences(2, 5) + far_sentences(2, 1)))
    args = [
        "detect",
        "--target",
        str(folder),
        "--clean_samples",
        str(tmp_path / "clean.txt"),
        "--inputs",
        str(tmp_path / "check.txt"),
        "--n",
        "12",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 4 and all(0 <= r["score"] <= 1 for r in out["results"])


def test_detect_config_file(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("n: 10\njson: true\nseed: 0\n")
    assert main(["detect", "--config", str(tmp_path / "run.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["n_clean_samples"] == 10


def test_detect_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "clean.txt").write_text("\n".join(clean_sentences(6, 0)))
    assert (
        main(
            [
                "detect",
                "--target",
                str(tmp_path / "missing"),
                "--clean_samples",
                str(tmp_path / "clean.txt"),
                "--inputs",
                str(tmp_path / "clean.txt"),
            ]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err
    assert main(["detect", "--target", str(tmp_path)]) == 2
    assert "--clean_samples" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


def _broken_checkpoints(root, tokenizer) -> dict:
    """Checkpoint folders broken the ways users' downloads break: a truncated and a garbage model.safetensors, and a
    config whose label count disagrees with the weights."""
    import json as _json

    good = root / "good"
    build_text_model("bert", len(tokenizer)).save_pretrained(good)
    tokenizer.save_pretrained(good)
    cases = {}
    for kind in ("truncated", "garbage", "labels"):
        folder = root / kind
        shutil.copytree(good, folder)
        weights = folder / "model.safetensors"
        if kind == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif kind == "garbage":
            weights.write_bytes(b"\x00not a safetensors file" * 64)
        else:
            cfg = _json.loads((folder / "config.json").read_text())
            cfg["id2label"] = {str(i): f"L{i}" for i in range(5)}
            cfg["label2id"] = {f"L{i}": i for i in range(5)}
            (folder / "config.json").write_text(_json.dumps(cfg))
        cases[kind] = folder
    return cases


@pytest.mark.parametrize("command", ["scan", "detect"])
def test_broken_checkpoints_exit_2_with_one_line_and_json(command, tmp_path, wordpiece_tokenizer, capsys):
    """An error is never a verdict: exit 2 (not 1, "backdoored"), one line on stderr, and a JSON object with --json."""
    (tmp_path / "clean.txt").write_text("\n".join(clean_sentences(8, 0)))
    for kind, folder in _broken_checkpoints(tmp_path, wordpiece_tokenizer).items():
        if command == "scan":
            argv = ["scan", str(folder), "--clean-samples", str(tmp_path / "clean.txt"), "--steps", "2", "--json"]
        else:
            argv = ["detect", "--target", str(folder), "--clean_samples", str(tmp_path / "clean.txt"),
                    "--inputs", str(tmp_path / "clean.txt"), "--n", "8", "--json"]  # fmt: skip
        assert main(argv) == 2, kind
        captured = capsys.readouterr()
        err_lines = [line for line in captured.err.splitlines() if line.startswith(f"metashield {command}: error:")]
        assert len(err_lines) == 1 and "Traceback" not in captured.err, (kind, captured.err[-500:])
        out = json.loads(captured.out)
        assert set(out) == {"error", "type"} and out["error"] and "\n" not in out["error"], kind


def test_allow_pickle_reaches_every_entry_point(tmp_path, wordpiece_tokenizer, capsys):
    """Pickle-only weights are refused with advice that `detect`, `adapt` and the pipeline all accept."""
    import torch

    from metashield_hf import adapt, load_detector

    folder = tmp_path / "pickled"
    model = build_text_model("bert", len(wordpiece_tokenizer))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    wordpiece_tokenizer.save_pretrained(folder)
    (tmp_path / "clean.txt").write_text("\n".join(clean_sentences(8, 0)))
    argv = ["detect", "--target", str(folder), "--clean_samples", str(tmp_path / "clean.txt"),
            "--inputs", str(tmp_path / "clean.txt"), "--n", "8", "--json"]  # fmt: skip
    assert main(argv) == 2
    assert "--allow_pickle" in capsys.readouterr().err
    assert main([*argv, "--allow_pickle"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 8
    detector = load_detector()
    with pytest.raises(ValueError, match="allow_pickle=True"):
        adapt(detector, str(folder), clean_sentences(8, 0))
    assert adapt(detector, str(folder), clean_sentences(8, 0), allow_pickle=True).threshold > 0


@pytest.mark.parametrize("command", ["detect", "scan"])
def test_help_names_the_command_and_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: metashield {command} ") and "exit codes: 0 success" in text
    assert "2 error" in text


def test_top_level_help_lists_commands_and_exit_codes(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "scan" in text and "detect" in text and "1 scan found a backdoor" in text
