"""The head-finding rule and the penultimate hook, on hand-built modules with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import build_text_model
from metashield_hf.targets import TARGETS, TargetAdapter, capture_penultimate, find_head, locate_head
from metashield_hf.targets.heads import select_tokens


class TwoHeads(nn.Module):
    """A distilled-style model: two heads that both run, logits = their mean (like DeiT-distilled)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.head_dist = nn.Linear(5, 3)

    def forward(self, x):
        h = self.body(x)
        return (self.head(h) + self.head_dist(h)) / 2


class TokenHead(nn.Module):
    """A decoder-style classifier: the head runs on every token, the last token's output is pooled."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.score = nn.Linear(6, 3, bias=False)

    def forward(self, ids):
        return self.score(self.embed(ids))[:, -1]


def test_roberta_rule_picks_out_proj(bpe_tokenizer):
    model = build_text_model("roberta", len(bpe_tokenizer))
    enc = bpe_tokenizer(["a small film"], return_tensors="pt")
    assert find_head(model, 3, dict(enc)) is model.classifier.out_proj
    info = locate_head(model, 3, dict(enc))
    assert "model_type 'roberta' rule → 'classifier.out_proj': found" in info.tried[0]
    # Without a dry run a single unambiguous candidate is still found.
    assert find_head(model, 3) is model.classifier.out_proj


def test_hidden_size_equal_to_num_labels_is_resolved_by_the_dry_run():
    # Every Linear has 3 outputs: only the dry run (last executed, output == logits) can tell the head.
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    assert find_head(model, 3, torch.randn(2, 4)) is model[4]
    with pytest.raises(ValueError, match="3 candidates and no example inputs"):
        find_head(model, 3)


def test_two_heads_are_refused():
    with pytest.raises(ValueError, match=r"several heads ran .* none alone gives the logits"):
        find_head(TwoHeads(), 3, torch.randn(2, 4))


def test_no_head_with_the_right_width():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"no nn.Linear with 7 outputs.*tried: nn.Linear with out_features=7: none"):
        find_head(model, 7, torch.randn(2, 4))


def test_bert_model_without_head_error_lists_what_was_tried(wordpiece_tokenizer):
    from builders import build_headless_bert

    model = build_headless_bert(len(wordpiece_tokenizer))
    with pytest.raises(ValueError, match=r"model_type 'bert' rule → 'classifier': not found.*pooler.dense"):
        find_head(model, 3)


def test_token_selection_for_decoder_heads():
    torch.manual_seed(0)
    model = TokenHead().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    info = locate_head(model, 3, ids)
    assert info.module is model.score
    with capture_penultimate(model, model.score) as cap:
        logits = model(ids)
    assert cap.inputs.shape == (2, 3, 6)
    torch.testing.assert_close(cap.penultimate(logits), model.embed(ids)[:, -1])  # the pooled (last) token
    # select_tokens known answer: the row whose head output equals the logits is picked.
    x = torch.arange(12.0).reshape(1, 3, 4)
    out = torch.tensor([[[0.0, 1.0], [5.0, 5.0], [2.0, 2.0]]])
    torch.testing.assert_close(select_tokens(x, out, torch.tensor([[5.0, 5.0]])), x[:, 1])


def test_capture_hook_is_removed_even_on_error():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_penultimate(model, model[1]) as cap:
            model(torch.ones(1, 2))
            raise RuntimeError("boom")
    assert cap.calls == 1 and not model[1]._forward_hooks
    with pytest.raises(ValueError, match="is not a submodule"):
        with capture_penultimate(model, nn.Linear(3, 2)):
            pass


def test_registry_contract():
    assert TARGETS.list() == ["peft", "timm", "torch", "transformers_image", "transformers_text"]
    for name, cls in TARGETS.items():
        assert issubclass(cls, TargetAdapter) and cls.name == name
        assert cls.modality in {"text", "image", "tensor", "auto"}
        assert cls.accepts(nn.Linear(2, 2)) is (name == "torch")  # only the plain torch adapter takes any module
