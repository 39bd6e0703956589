"""The layer trajectory: which blocks each family's rule picks, how they are pooled, and that pooling is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import build_image_model, build_lora_model, build_text_model, build_timm_model
from metashield_hf.targets import load_target
from metashield_hf.targets.base import TargetOutput
from metashield_hf.targets.layers import block_modules, evenly_spaced, pool_activation


def test_evenly_spaced_known_answers():
    assert evenly_spaced(12, 4) == [0, 4, 7, 11]
    assert evenly_spaced(3, 8) == [0, 1, 2]
    assert evenly_spaced(5, 1) == [4]
    assert evenly_spaced(0, 3) == [] and evenly_spaced(4, 0) == []


def test_pool_activation_shapes_and_mask():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(pool_activation(x), x.mean((2, 3)))
    seq = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(pool_activation(seq, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool_activation(seq), seq.mean(1))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.mid = nn.Linear(8, 6)
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.mid(self.features(x))))


def test_plain_rule_expands_containers_and_leaves_the_head_out():
    model = Plain()
    names = [n for n, _ in block_modules(model, model.classifier)]
    assert names == ["features.0", "features.2", "mid"]
    wrapped = nn.Sequential(model)  # a lone wrapper is looked through
    assert [n for n, _ in block_modules(wrapped, model.classifier)] == ["0.features.0", "0.features.2", "0.mid"]


def test_bert_layers_are_the_masked_mean_of_each_encoder_layer(wordpiece_tokenizer):
    model = build_text_model("bert", wordpiece_tokenizer.vocab_size)
    adapter = load_target(model, wordpiece_tokenizer)
    texts = ["a fine film", "a dull and very long film about nothing at all"]
    out = adapter(texts, layers=True)
    assert [n for n, _ in adapter.layer_blocks()] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    enc = wordpiece_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states  # embeddings, layer 0, layer 1
    mask = enc["attention_mask"][..., None].float()
    for got, h in zip(out.layers, hidden[1:], strict=True):
        torch.testing.assert_close(got, (h * mask).sum(1) / mask.sum(1), atol=1e-5, rtol=1e-5)
    alone = adapter(texts[:1], layers=True)  # padding in a batch changes nothing
    torch.testing.assert_close(alone.layers[-1], out.layers[-1][:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_other_text_families_have_their_encoder_layers(family, wordpiece_tokenizer, bpe_tokenizer):
    tok = bpe_tokenizer if family == "roberta" else wordpiece_tokenizer
    adapter = load_target(build_text_model(family, tok.vocab_size), tok)
    out = adapter(["a fine film", "a dull film"], layers=True)
    assert len(out.layers) == 2 and all(x.shape == (2, 32) and torch.isfinite(x).all() for x in out.layers)
    assert all(".layer." in n for n, _ in adapter.layer_blocks())


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext"])
def test_image_families(family, pil_images):
    model, processor = build_image_model(family)
    adapter = load_target(model, processor)
    out = adapter(pil_images, layers=True)
    assert len(out.layers) == 2 and all(x.shape[0] == 4 and torch.isfinite(x).all() for x in out.layers)
    plain = adapter(pil_images)
    assert plain.layers == () and torch.equal(plain.logits, out.logits)


def test_timm_uses_feature_info_and_max_layers(pil_images):
    adapter = load_target(build_timm_model())
    assert [n for n, _ in adapter.layer_blocks()] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    adapter.max_layers = 2
    assert [n for n, _ in adapter.layer_blocks()] == ["act1", "layer4"]
    out = adapter(pil_images[:2], layers=True)
    assert [tuple(x.shape) for x in out.layers] == [(2, 32), (2, 96)]


def test_peft_model_has_its_base_models_layers(wordpiece_tokenizer):
    model = build_lora_model(build_text_model("bert", wordpiece_tokenizer.vocab_size), 0, target_modules=["query"])
    out = load_target(model, wordpiece_tokenizer)(["a fine film"], layers=True)
    assert len(out.layers) == 2


def test_target_output_indexing_and_cat_keep_layers():
    out = TargetOutput(torch.randn(5, 3), torch.randn(5, 4), (torch.randn(5, 2), torch.randn(5, 6)))
    part = out[torch.tensor([0, 2])]
    assert part.layers[1].shape == (2, 6) and torch.equal(part.layers[0], out.layers[0][[0, 2]])
    both = TargetOutput.cat([out[:2], out[2:]])
    assert all(torch.equal(a, b) for a, b in zip(both.layers, out.layers, strict=True))
    with pytest.raises(ValueError, match="different numbers of layers"):
        TargetOutput.cat([out, TargetOutput(torch.randn(1, 3), torch.randn(1, 4))])
