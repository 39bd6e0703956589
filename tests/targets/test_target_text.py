"""Text classifiers (BERT, DistilBERT, RoBERTa) through the transformers_text adapter."""

from __future__ import annotations

import pytest
import torch

from builders import NUM_LABELS, SENTENCES, build_text_model
from metashield_hf.targets import TransformersTextAdapter, load_target

FAMILIES = {
    "bert": ("wordpiece_tokenizer", "classifier"),
    "distilbert": ("wordpiece_tokenizer", "classifier"),
    "roberta": ("bpe_tokenizer", "classifier.out_proj"),
}


def _reference_penultimate(model, family, enc):
    """The head's input computed independently of any hook (HF-NOTES §3 reference column)."""
    with torch.no_grad():
        if family == "bert":
            return model.bert(**enc).pooler_output
        if family == "distilbert":
            h = model.distilbert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            return torch.relu(model.pre_classifier(h[:, 0]))
        h = model.roberta(**enc).last_hidden_state
        return torch.tanh(model.classifier.dense(h[:, 0]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_families(family, request):
    tok_fixture, head_name = FAMILIES[family]
    tok = request.getfixturevalue(tok_fixture)
    model = build_text_model(family, len(tok))
    adapter = load_target(model, tok, batch_size=3)
    assert isinstance(adapter, TransformersTextAdapter) and adapter.modality == "text"
    assert adapter.head_name == head_name and adapter.num_classes == NUM_LABELS
    out = adapter(SENTENCES)  # 8 inputs, batches of 3 with padding to different lengths
    assert out.logits.shape == (8, NUM_LABELS) and out.penultimate.shape == (8, 32)
    assert out.logits.dtype == torch.float32 and out.logits.device.type == "cpu"
    assert torch.isfinite(out.penultimate).all()
    torch.testing.assert_close(adapter.head_logits(out.penultimate), out.logits, atol=1e-5, rtol=1e-5)
    # Known answers: the model's own logits, and the head input computed without hooks.
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    if family == "distilbert":
        enc.pop("token_type_ids", None)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(**enc).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.penultimate, _reference_penultimate(model, family, enc), atol=1e-5, rtol=1e-4)
    # One string is one input.
    torch.testing.assert_close(adapter(SENTENCES[1]).logits, out.logits[1:2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_save_and_load_folder(family, request, tmp_path):
    tok = request.getfixturevalue(FAMILIES[family][0])
    model = build_text_model(family, len(tok), seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_target(tmp_path)  # tokenizer from the folder
    assert isinstance(loaded, TransformersTextAdapter)
    assert next(loaded.model.parameters()).dtype == torch.float32
    expected = load_target(model, tok)(SENTENCES[:4])
    got = loaded(SENTENCES[:4])
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.penultimate, expected.penultimate, atol=1e-5, rtol=1e-4)


def test_dataset_and_column_inputs(wordpiece_tokenizer):
    from datasets import Dataset

    adapter = load_target(build_text_model("bert", len(wordpiece_tokenizer)), wordpiece_tokenizer)
    ds = Dataset.from_dict({"label": [0, 1, 2, 0], "sentence": SENTENCES[:4]})  # the string column is not first
    expected = adapter(SENTENCES[:4])
    torch.testing.assert_close(adapter(ds).logits, expected.logits)
    torch.testing.assert_close(adapter(ds["sentence"]).logits, expected.logits)
    with pytest.raises(ValueError, match=r"the dataset has no string column \(features: .*label"):
        adapter(ds.remove_columns("sentence"))


def test_images_to_text_model_are_refused(wordpiece_tokenizer, pil_images):
    adapter = load_target(build_text_model("distilbert", len(wordpiece_tokenizer)), wordpiece_tokenizer)
    with pytest.raises(ValueError, match=r"expects text \(str\), got images: PIL.Image"):
        adapter(pil_images[:2])
    with pytest.raises(ValueError, match="expects text"):
        adapter(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no inputs"):
        adapter([])


def test_long_text_is_truncated_to_the_position_limit(bpe_tokenizer):
    adapter = load_target(build_text_model("roberta", len(bpe_tokenizer)), bpe_tokenizer)
    # RoBERTa positions start after padding_idx (1): 66 positions leave 64 tokens.
    assert adapter.max_length == 64
    out = adapter([" ".join(SENTENCES * 10)])
    assert out.logits.shape == (1, NUM_LABELS)


def test_text_model_needs_a_tokenizer(wordpiece_tokenizer):
    model = build_text_model("bert", len(wordpiece_tokenizer))
    with pytest.raises(ValueError, match="needs its tokenizer: pass processor=AutoTokenizer"):
        load_target(model)
