"""The bundled examples (`metashield_hf.zoo.examples`): the catalogue, the digits picture conversion, the SST-2 pair,
the federated digits pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metashield_hf.zoo.examples import (
    BUNDLED_EXAMPLES,
    digits_image_to_tensor,
    digits_tensor_to_image,
    load_bundled_example,
)


def test_digits_picture_round_trip_and_sketch_inversion():
    from PIL import Image

    x = torch.rand(1, 8, 8) * 0.4  # a dark picture, as the digits are (light strokes on black)
    back = digits_image_to_tensor(digits_tensor_to_image(x))
    assert back.shape == (1, 8, 8) and torch.allclose(back, x, atol=1 / 255)
    # A sketch: dark ink on a transparent (= white paper) 64x64 canvas is inverted and binned down to 8x8.
    canvas = np.zeros((64, 64, 4), dtype=np.uint8)
    canvas[:, 24:40] = (0, 0, 0, 255)  # a vertical black bar in the middle
    sketch = digits_image_to_tensor(Image.fromarray(canvas, "RGBA"))
    assert sketch.shape == (1, 8, 8)
    assert sketch[0, :, 3:5].min() > 0.99 and sketch[0, :, :3].max() < 0.01  # the bar is the light stroke now
    big = digits_tensor_to_image(x, scale=4)
    assert big.size == (32, 32)


def test_unknown_example_names_the_choices():
    with pytest.raises(ValueError, match="unknown bundled example 'nope'; use one of"):
        load_bundled_example("nope")
    assert {d for _, d, _ in BUNDLED_EXAMPLES.values()} == {"cv", "nlp", "fl"}


@pytest.mark.slow
def test_sst2_pair_has_a_working_trigger_only_when_poisoned():
    """The text pair (trained once, ~15 s each, then cached): the rare word forces the target only when poisoned."""
    from metashield_hf import load_target

    bad, ok = load_bundled_example("sst2-rare-word"), load_bundled_example("sst2-clean")
    assert bad.backdoored and not ok.backdoored and bad.modality == "text"
    assert bad.attack_success_rate > 0.9 > 0.6 > ok.attack_success_rate
    assert bad.clean_accuracy > 0.55 and ok.clean_accuracy > 0.55  # 600 phrases, a tiny BERT from scratch
    assert all("cf" in t.split() for t in bad.test_triggered[:20])
    out = load_target(bad.model)(bad.clean_pool[:4])
    assert out.logits.shape == (4, 2)


@pytest.mark.slow
def test_fl_pair_has_a_working_trigger_only_with_the_malicious_client():
    """The federated pair (FedAvg over ten digits clients, trained once, then cached): the patch forces class 0 on
    the global model only when one client was malicious; both keep most of their clean accuracy."""
    bad, ok = load_bundled_example("fl-digits-badnets"), load_bundled_example("fl-digits-clean")
    assert bad.domain == ok.domain == "fl" and bad.modality == ok.modality == "image"
    assert bad.backdoored and not ok.backdoored and bad.attack_params["name"] == "model_replacement"
    assert bad.attack_success_rate >= 0.8 and ok.attack_success_rate < 0.2
    assert bad.clean_accuracy > 0.8 and ok.clean_accuracy > 0.9
    assert bad.clean_pool[0].shape == (1, 8, 8)
    with torch.no_grad():
        assert (bad.model(torch.stack(bad.test_triggered[:50])).argmax(-1) == 0).float().mean() >= 0.8
