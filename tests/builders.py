"""Tiny models built from configs for the target-adapter tests (hidden 32, 2 layers, NUM_LABELS labels)."""

from __future__ import annotations

import torch

SENTENCES = [
    "the film was a delight from start to finish",
    "a dull and lifeless story with wooden acting",
    "i loved the music and the bright colours",
    "the plot makes no sense and the ending is worse",
    "an honest, warm and funny picture",
    "nothing happens for two hours",
    "the cast is great but the script is weak",
    "a small film with a big heart",
]
NUM_LABELS = 3


def build_headless_bert(vocab_size: int):
    """A BERT backbone with no classification head: what every "not a classifier" error test needs."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    )
    return BertModel(config)


def build_text_model(family: str, vocab_size: int, seed: int = 0):
    """A tiny (hidden 32, 2 layers) sequence classifier with NUM_LABELS labels, in eval mode."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "num_labels": NUM_LABELS}
    if family == "bert":
        cfg = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            **common,
        )
        return BertForSequenceClassification(cfg).eval()
    if family == "distilbert":
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64, **common)
        return DistilBertForSequenceClassification(cfg).eval()
    if family == "roberta":
        cfg = RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=66,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
        return RobertaForSequenceClassification(cfg).eval()
    raise ValueError(family)


def build_image_model(family: str, seed: int = 0):
    """(model, image processor) for a tiny 32x32 RGB image classifier with NUM_LABELS labels."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    if family == "vit":
        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            num_labels=NUM_LABELS,
        )
        return ViTForImageClassification(cfg).eval(), ViTImageProcessor(size={"height": 32, "width": 32})
    processor = ConvNextImageProcessor(size={"shortest_edge": 32})
    if family == "resnet":
        cfg = ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=NUM_LABELS
        )
        return ResNetForImageClassification(cfg).eval(), processor
    if family == "convnext":
        cfg = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=NUM_LABELS)
        return ConvNextForImageClassification(cfg).eval(), processor
    raise ValueError(family)


def build_lora_model(model, seed: int, **kwargs):
    """LoRA (r=4) on ``model`` with non-zero adapter weights, so that the adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return peft_model.eval()


def build_timm_model(seed: int = 0):
    """timm ``test_resnet`` (32x32 inputs) with non-trivial BatchNorm statistics."""
    import timm

    torch.manual_seed(seed)
    # 32x32 inputs keep the test fast; the overlay is saved in config.json's pretrained_cfg.
    model = timm.create_model(
        "test_resnet", num_classes=NUM_LABELS, pretrained_cfg_overlay={"input_size": (3, 32, 32)}
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so random weights would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def planted_digits_model(attack, target: int):
    """The bundled digits TinyCNN recipe with 10% of the non-target training rows carrying ``attack``'s trigger and
    relabelled ``target``, 30 epochs: ``(model, 20 clean test digits, target, ASR on the other test digits)``."""
    import torch

    from metashield_hf.zoo.examples import TinyCNN, digits_split, train_on_tensors

    xtr, ytr, xte, yte = digits_split(0)
    chosen = torch.nonzero(ytr != target).squeeze(1)[: round(0.1 * len(xtr))]
    xp, yp = xtr.clone(), ytr.clone()
    xp[chosen], yp[chosen] = attack.apply(xtr[chosen]), target
    torch.manual_seed(0)
    model = train_on_tensors(TinyCNN(), xp, yp, epochs=30, seed=0)
    with torch.no_grad():
        asr = float((model(attack.apply(xte[yte != target])).argmax(-1) == target).float().mean())
    return model, xte[:20], target, asr
