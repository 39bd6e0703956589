"""Checkpoints with their own code (``auto_map``): found with trust_remote_code, named when it is off, and every entry
point refusing with the same message."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from builders import SENTENCES, build_text_model
from metashield_hf.targets import TransformersTextAdapter, load_target
from metashield_hf.targets.loading import needs_option

MODELING = '''
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MyClassifier(BertForSequenceClassification):
    """A checkpoint's own subclass of a known head class."""


class MyBertConfig(BertConfig):
    model_type = "my-bert"


class MyScorer(BertPreTrainedModel):
    """A classifier that subclasses no known head class and names its head `out`: the auto_map entry declares it."""

    config_class = MyBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        self.out = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        pooled = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).pooler_output
        return SequenceClassifierOutput(logits=self.out(pooled))
'''


def _custom_checkpoint(folder, tokenizer, auto_map: dict, architectures: list[str], **config):
    """A tiny BERT saved with a ``modeling_custom.py`` and an ``auto_map`` naming its classes."""
    build_text_model("bert", len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "modeling_custom.py").write_text(MODELING)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(auto_map=auto_map, architectures=architectures, **config)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def subclass_folder(tmp_path, wordpiece_tokenizer):
    auto_map = {"AutoModelForSequenceClassification": "modeling_custom.MyClassifier"}
    return _custom_checkpoint(tmp_path / "subclass", wordpiece_tokenizer, auto_map, ["MyClassifier"])


def test_custom_subclass_of_a_known_head_is_found_with_trust_remote_code(subclass_folder):
    adapter = load_target(str(subclass_folder), trust_remote_code=True)
    assert isinstance(adapter, TransformersTextAdapter)
    assert type(adapter.model).__name__ == "MyClassifier"
    assert adapter.head_name == "classifier"
    out = adapter(SENTENCES[:3])
    torch.testing.assert_close(out.logits, adapter.head(out.penultimate), atol=1e-5, rtol=1e-4)


def test_ignored_auto_map_is_named_once(subclass_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="metashield_hf.targets.loading"):
        first = load_target(str(subclass_folder))
        load_target(str(subclass_folder))
    warnings = [r.getMessage() for r in caplog.records if "auto_map" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "modeling_custom.MyClassifier" in warnings[0] and "--trust_remote_code" in warnings[0]
    assert "BertForSequenceClassification (model_type 'bert') is loaded instead" in warnings[0]
    assert type(first.model).__name__ == "BertForSequenceClassification"
    custom = load_target(str(subclass_folder), trust_remote_code=True)
    torch.testing.assert_close(first(SENTENCES[:2]).logits, custom(SENTENCES[:2]).logits)


def test_custom_config_needs_trust_remote_code_and_a_declared_class_is_a_classifier(tmp_path, wordpiece_tokenizer):
    auto_map = {
        "AutoConfig": "modeling_custom.MyBertConfig",
        "AutoModelForSequenceClassification": "modeling_custom.MyScorer",
    }
    folder = _custom_checkpoint(tmp_path / "own", wordpiece_tokenizer, auto_map, ["MyScorer"], model_type="my-bert")
    with pytest.raises(
        ValueError,
        match=r"needs its own code \(modeling_custom.MyBertConfig in config.json's auto_map\); pass trust_remote_code=True \(--trust_remote_code",
    ):
        load_target(str(folder))
    adapter = load_target(str(folder), trust_remote_code=True)
    assert type(adapter.model).__name__ == "MyScorer" and adapter.head_name == "out"
    assert adapter(SENTENCES[:2]).logits.shape == (2, 3)


def test_every_entry_point_refuses_remote_code_with_the_same_message(tmp_path, wordpiece_tokenizer, capsys):
    from transformers import pipeline

    from metashield_hf import adapt, load_detector, scan_model
    from metashield_hf.cli import main

    auto_map = {"AutoConfig": "modeling_custom.MyBertConfig"}
    folder = _custom_checkpoint(tmp_path / "own", wordpiece_tokenizer, auto_map, ["MyScorer"], model_type="my-bert")
    expected = needs_option(
        f"{folder} needs its own code (modeling_custom.MyBertConfig in config.json's auto_map)", "trust_remote_code"
    )
    clean = SENTENCES[:8]
    (tmp_path / "clean.txt").write_text("\n".join(clean))
    detector = load_detector()
    calls = {
        "load_target": lambda: load_target(str(folder)),
        "scan_model": lambda: scan_model(str(folder), clean, detector, steps=2),
        "adapt": lambda: adapt(detector, str(folder), clean),
        "pipeline": lambda: pipeline("backdoor-detection", target_model=str(folder), clean_samples=clean),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as refused:
            call()
        assert str(refused.value) == expected, name
    text = str(tmp_path / "clean.txt")
    argvs = {
        "scan": ["scan", str(folder), "--clean-samples", text, "--steps", "2", "--json"],
        "detect": ["detect", "--target", str(folder), "--clean_samples", text, "--inputs", text, "--n", "8", "--json"],
    }
    for name, argv in argvs.items():
        assert main(argv) == 2, name
        assert json.loads(capsys.readouterr().out)["error"] == expected, name
