"""load_target: dispatch, folders, Hub ids offline, and the refusals."""

from __future__ import annotations

import pytest
import torch

from builders import SENTENCES, build_text_model
from metashield_hf.targets import TransformersTextAdapter, load_target


def test_adapter_is_returned_as_is(wordpiece_tokenizer):
    adapter = load_target(build_text_model("bert", len(wordpiece_tokenizer)), wordpiece_tokenizer)
    assert load_target(adapter) is adapter


def test_transformers_model_without_head_is_refused(wordpiece_tokenizer, tmp_path):
    from builders import build_headless_bert

    model = build_headless_bert(len(wordpiece_tokenizer))
    with pytest.raises(
        ValueError,
        match=r"no target adapter accepts BertModel; tried peft .*transformers_text.*torch.*"
        r"AutoModelForSequenceClassification",
    ):
        load_target(model, wordpiece_tokenizer)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds \['BertModel'\], which is not a classifier.*tried sequence"):
        load_target(tmp_path)


def test_missing_folder_and_bad_arguments(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"no folder '{missing}'"):
        load_target(str(missing))
    with pytest.raises(ValueError, match="has neither config.json nor adapter_config.json"):
        load_target(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; pass the checkpoint folder"):
        load_target(tmp_path / "weights.bin")
    with pytest.raises(TypeError, match="load_target takes a model, a folder or a Hub id, got int"):
        load_target(3)


def test_unknown_hub_id_offline_fails_clearly():
    # conftest sets HF_HUB_OFFLINE=1: nothing is downloaded, the error names the id and the reason.
    with pytest.raises(
        OSError, match=r"'metashield-test/no-such-model' is not a local folder and could not be loaded"
    ):
        load_target("metashield-test/no-such-model")


def test_transformers_pickle_only_folder(wordpiece_tokenizer, tmp_path):
    model = build_text_model("distilbert", len(wordpiece_tokenizer), seed=7)
    model.save_pretrained(tmp_path)
    wordpiece_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only has pickle weights \(pytorch_model.bin\); pass allow_pickle=True"):
        load_target(tmp_path)
    loaded = load_target(tmp_path, allow_pickle=True)
    assert isinstance(loaded, TransformersTextAdapter)
    expected = load_target(model, wordpiece_tokenizer)(SENTENCES[:3]).logits
    torch.testing.assert_close(loaded(SENTENCES[:3]).logits, expected, atol=1e-5, rtol=1e-4)


def test_folder_without_weights(wordpiece_tokenizer, tmp_path):
    build_text_model("bert", len(wordpiece_tokenizer)).config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has no weights \(model.safetensors\)"):
        load_target(tmp_path)


def test_model_from_a_folder_finds_its_tokenizer(wordpiece_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    build_text_model("bert", len(wordpiece_tokenizer)).save_pretrained(tmp_path)
    wordpiece_tokenizer.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32)
    adapter = load_target(model)  # no processor: taken from config._name_or_path
    assert adapter(SENTENCES[:2]).logits.shape == (2, 3)
