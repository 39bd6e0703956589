"""timm models: in memory, and saved with save_for_hf then loaded back through load_target(folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import NUM_LABELS, build_timm_model
from metashield_hf.targets import TimmAdapter, load_target


def test_timm_in_memory(pil_images):
    from timm.data import create_transform, resolve_data_config

    model = build_timm_model()
    adapter = load_target(model, batch_size=3)
    assert isinstance(adapter, TimmAdapter) and adapter.head_name == "fc" and adapter.num_classes == NUM_LABELS
    out = adapter(pil_images)
    assert out.logits.shape == (4, NUM_LABELS) and out.penultimate.shape == (4, model.num_features)
    torch.testing.assert_close(adapter.head_logits(out.penultimate), out.logits, atol=1e-5, rtol=1e-5)
    # Known answers: timm's own transform + forward_head(pre_logits=True).
    transform = create_transform(**resolve_data_config(model=model))
    x = torch.stack([transform(img) for img in pil_images])
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x), atol=1e-5, rtol=1e-4)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(out.penultimate, pre, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter(np.array(pil_images[0])).logits, out.logits[:1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="expects images"):
        adapter(["not an image"])


def test_timm_save_for_hf_roundtrip(tmp_path, pil_images):
    import timm

    model = build_timm_model(seed=3)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    loaded = load_target(tmp_path)
    assert isinstance(loaded, TimmAdapter)
    expected = load_target(model)(pil_images)
    got = loaded(pil_images)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.penultimate, expected.penultimate, atol=1e-5, rtol=1e-4)


def test_timm_pickle_only_folder(tmp_path, pil_images):
    import timm

    model = build_timm_model(seed=4)
    timm.models.save_for_hf(model, tmp_path)  # default: pytorch_model.bin only
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"only has pickle weights \(pytorch_model.bin\); pass allow_pickle=True"):
        load_target(tmp_path)
    loaded = load_target(tmp_path, allow_pickle=True)
    torch.testing.assert_close(loaded(pil_images).logits, load_target(model)(pil_images).logits, atol=1e-5, rtol=1e-4)
