"""Plain torch.nn.Module classifiers through the torch adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from metashield_hf.targets import TorchAdapter, load_target


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.fc = nn.Linear(16, 8)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc(self.features(x))))


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def test_torch_cnn_known_answers():
    model = _cnn()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    adapter = load_target(model, batch_size=2)
    assert isinstance(adapter, TorchAdapter) and adapter.modality == "tensor"
    out = adapter(x)
    assert adapter.head_name == "classifier" and adapter.num_classes == 3
    assert out.logits.shape == (5, 3) and out.penultimate.shape == (5, 8)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x))
        torch.testing.assert_close(out.penultimate, torch.relu(model.fc(model.features(x))))
    torch.testing.assert_close(adapter.head_logits(out.penultimate), out.logits, atol=1e-6, rtol=1e-5)
    # A list of samples, one sample, and a numpy batch give the same rows.
    torch.testing.assert_close(adapter(list(x)).logits, out.logits)
    torch.testing.assert_close(adapter(x[2]).logits, out.logits[2:3])
    torch.testing.assert_close(adapter(x.numpy()).logits, out.logits)
    # Outputs are ordinary tensors (not inference tensors): downstream code may modify them.
    out.penultimate.add_(1.0)


def test_head_before_any_call_needs_inputs():
    adapter = load_target(_cnn())
    with pytest.raises(ValueError, match="found on the first batch: call the adapter on inputs first"):
        _ = adapter.head
    built = TorchAdapter(_cnn(), example_inputs=torch.zeros(1, 1, 8, 8))
    assert built.head is built.model.classifier


def test_wrong_shapes_and_types():
    adapter = load_target(_cnn())
    with pytest.raises(ValueError, match=r"failed on a batch of shape \(2, 3, 8, 8\)"):
        adapter(torch.rand(2, 3, 8, 8))  # 3 channels into a 1-channel CNN
    with pytest.raises(ValueError, match="samples of different shapes"):
        adapter([torch.rand(1, 8, 8), torch.rand(1, 6, 6)])
    with pytest.raises(ValueError, match="expects preprocessed tensors, got str"):
        adapter("some text")
    with pytest.raises(ValueError, match="expects preprocessed tensors, got str"):
        adapter(["some text"])


def test_module_without_a_linear_head():
    no_linear = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no classification head in Sequential: it has no nn.Linear layer"):
        load_target(no_linear)


class LogSoftmaxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return torch.log_softmax(self.head(torch.tanh(self.body(x))), -1)


def test_post_processed_head_output_is_used_as_logits():
    torch.manual_seed(0)
    model = LogSoftmaxNet().eval()
    x = torch.randn(4, 4)
    out = load_target(model)(x)
    with torch.no_grad():
        raw = model.head(torch.tanh(model.body(x)))
    torch.testing.assert_close(out.logits, raw)  # the head's output, not the log-probabilities
    torch.testing.assert_close(out.logits.log_softmax(-1), model(x))


def test_nan_activations_are_reported():
    model = _cnn()
    x = torch.rand(4, 1, 8, 8)
    x[1, 0, 0, 0] = float("nan")
    x[3] = float("inf")
    adapter = load_target(model)
    with pytest.raises(ValueError, match=r"SmallCNN produced NaN/inf activations for 2 of 4 rows"):
        adapter(x)  # the first call also finds the head: NaN rows must not confuse it
    assert adapter.head_name == "classifier" and not adapter._find_head().logits_from_head


def test_device_and_processor_options():
    model = _cnn()
    adapter = load_target(model, device="cpu")
    assert adapter.device == torch.device("cpu")
    scaled = TorchAdapter(model, processor=lambda t: t * 2)
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(scaled(x).logits, adapter(x * 2).logits)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TorchAdapter(model, batch_size=0)
    assert adapter(np.zeros((3, 1, 8, 8), dtype=np.uint8)).logits.shape == (3, 3)
