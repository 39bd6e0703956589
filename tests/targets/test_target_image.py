"""Image classifiers (ViT, ResNet, ConvNeXt) through the transformers_image adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import NUM_LABELS, build_image_model
from metashield_hf.targets import TransformersImageAdapter, load_target

HEADS = {"vit": ("classifier", 32), "resnet": ("classifier.1", 16), "convnext": ("classifier", 16)}


def _reference_penultimate(model, family, pixel_values):
    with torch.no_grad():
        if family == "vit":
            return model.vit(pixel_values).last_hidden_state[:, 0]  # layernormed CLS
        if family == "resnet":
            return model.resnet(pixel_values).pooler_output.flatten(1)
        return model.convnext(pixel_values).pooler_output


@pytest.mark.parametrize("family", list(HEADS))
def test_image_families(family, pil_images):
    model, processor = build_image_model(family)
    adapter = load_target(model, processor, batch_size=3)
    assert isinstance(adapter, TransformersImageAdapter) and adapter.modality == "image"
    head_name, width = HEADS[family]
    assert adapter.head_name == head_name and adapter.num_classes == NUM_LABELS
    out = adapter(pil_images)
    assert out.logits.shape == (4, NUM_LABELS) and out.penultimate.shape == (4, width)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.penultimate).all()
    torch.testing.assert_close(adapter.head_logits(out.penultimate), out.logits, atol=1e-5, rtol=1e-5)
    # Known answer: the processor's own output of the same PIL images through the model, without hooks.
    pixels = processor(images=pil_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(pixel_values=pixels).logits, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out.penultimate, _reference_penultimate(model, family, pixels), atol=1e-4, rtol=1e-3)


def test_array_and_tensor_inputs_agree(pil_images):
    model, processor = build_image_model("vit")
    adapter = load_target(model, processor)
    img = pil_images[0]
    hwc = np.array(img)  # uint8 HWC
    chw = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255  # float CHW in [0, 1]
    ref = adapter([img]).logits
    torch.testing.assert_close(adapter(hwc).logits, ref)  # uint8 arrays take exactly the PIL path
    float_ref = adapter(chw).logits
    for item in (chw.numpy(), chw[None], chw.permute(1, 2, 0).numpy()):  # CHW array, NCHW batch, float HWC
        torch.testing.assert_close(adapter(item).logits, float_ref, atol=1e-5, rtol=1e-4)
    # Float images are resized without the uint8 rounding of the PIL path: equal up to that rounding.
    torch.testing.assert_close(float_ref, ref, atol=5e-3, rtol=0)
    batch = torch.stack([chw, chw.flip(-1)])
    assert adapter(batch).logits.shape == (2, NUM_LABELS)


def test_grey_images_are_converted_to_rgb(pil_images):
    model, processor = build_image_model("resnet")
    adapter = load_target(model, processor)
    grey = pil_images[1].convert("L")
    expected = adapter([grey.convert("RGB")]).logits
    torch.testing.assert_close(adapter([grey]).logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter(np.array(grey)).logits, expected, atol=1e-5, rtol=1e-4)  # uint8 (H, W)
    grey_float = torch.from_numpy(np.array(grey)).float()[None] / 255  # (1, H, W) in [0, 1]
    torch.testing.assert_close(adapter(grey_float).logits, adapter(grey_float.expand(3, -1, -1)).logits)
    rgba = pil_images[1].convert("RGBA")
    torch.testing.assert_close(adapter(rgba).logits, adapter(pil_images[1]).logits, atol=1e-5, rtol=1e-4)


def test_dataset_with_an_image_column(pil_images):
    from datasets import Dataset, Features, Image, Value

    model, processor = build_image_model("convnext")
    adapter = load_target(model, processor)
    ds = Dataset.from_dict(
        {"caption": ["a", "b", "c", "d"], "img": pil_images},
        features=Features({"caption": Value("string"), "img": Image()}),
    )
    torch.testing.assert_close(adapter(ds).logits, adapter(pil_images).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(adapter(ds["img"]).logits, adapter(pil_images).logits, atol=1e-5, rtol=1e-4)


def test_text_to_image_model_is_refused():
    model, processor = build_image_model("vit")
    adapter = load_target(model, processor)
    with pytest.raises(ValueError, match=r"expects images .* got str 'a dull film'"):
        adapter("a dull film")
    with pytest.raises(ValueError, match="expects images"):
        adapter(["a dull film", "another"])
    with pytest.raises(ValueError, match=r"expects 3-channel images, got .*\(2, 8, 8\)"):
        adapter(torch.rand(2, 8, 8))


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_save_and_load_folder(family, tmp_path, pil_images):
    model, processor = build_image_model(family, seed=2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = load_target(str(tmp_path))
    assert isinstance(loaded, TransformersImageAdapter)
    expected = load_target(model, processor)(pil_images)
    got = loaded(pil_images)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.penultimate, expected.penultimate, atol=1e-5, rtol=1e-4)
