"""PEFT LoRA models: in memory, and as an adapter folder on top of a base folder."""

from __future__ import annotations

import json

import pytest
import torch

from builders import NUM_LABELS, SENTENCES, build_lora_model, build_text_model
from metashield_hf.targets import PeftAdapter, load_target


def test_lora_sequence_classifier(wordpiece_tokenizer):
    base = build_text_model("bert", len(wordpiece_tokenizer))
    model = build_lora_model(base, seed=0, task_type="SEQ_CLS", target_modules=["query", "value"])
    adapter = load_target(model, wordpiece_tokenizer)
    assert isinstance(adapter, PeftAdapter) and adapter.modality == "text" and adapter.num_classes == NUM_LABELS
    assert adapter.head_name == "base_model.model.classifier.modules_to_save.default"  # not original_module
    out = adapter(SENTENCES)
    assert out.penultimate.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(adapter.head_logits(out.penultimate), out.logits, atol=1e-5, rtol=1e-5)
    enc = wordpiece_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(**enc).logits, atol=1e-5, rtol=1e-4)


def test_lora_on_the_head_itself_is_merged(wordpiece_tokenizer):
    base = build_text_model("bert", len(wordpiece_tokenizer))
    model = build_lora_model(base, seed=1, target_modules=["classifier"])  # no task_type: the classifier gets LoRA
    adapter = load_target(model, wordpiece_tokenizer)
    # The hooked module is the LoRA layer (lora_B.default is Linear(4, 3) and must not be picked).
    assert adapter.head_name == "base_model.model.classifier"
    layer = model.base_model.model.classifier
    merged = (
        layer.base_layer.weight
        + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    torch.testing.assert_close(adapter.head.weight, merged, atol=1e-6, rtol=1e-5)
    out = adapter(SENTENCES[:4])
    torch.testing.assert_close(adapter.head_logits(out.penultimate), out.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(layer.base_layer(out.penultimate), out.logits, atol=1e-3)  # the merge mattered


def test_adapter_folder_roundtrip(wordpiece_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    build_text_model("bert", len(wordpiece_tokenizer), seed=5).save_pretrained(base_dir)
    wordpiece_tokenizer.save_pretrained(base_dir)  # the tokenizer lives with the base only
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=torch.float32)
    model = build_lora_model(base, seed=2, task_type="SEQ_CLS", target_modules=["query", "value"])
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    loaded = load_target(adapter_dir)
    assert isinstance(loaded, PeftAdapter)
    expected = load_target(model, wordpiece_tokenizer)(SENTENCES)
    got = loaded(SENTENCES)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.penultimate, expected.penultimate, atol=1e-5, rtol=1e-4)


def test_adapter_folder_without_base_path(wordpiece_tokenizer, tmp_path):
    model = build_lora_model(
        build_text_model("bert", len(wordpiece_tokenizer)), seed=3, task_type="SEQ_CLS", target_modules=["query"]
    )
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None  # what a base built with from_config leaves (HF-NOTES gotcha 12)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no base_model_name_or_path"):
        load_target(tmp_path)
