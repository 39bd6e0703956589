"""The bundled examples now live in ``metashield_hf.zoo.examples``; this module re-exports them so existing imports
keep working until every caller imports from the zoo."""

from __future__ import annotations

from .zoo.examples import (
    BUNDLED_EXAMPLES,
    EXAMPLE_VERSION,
    TEXT_EXAMPLE_VERSION,
    TEXT_TRIGGER,
    BundledExample,
    DigitsExample,
    TextExample,
    TinyCNN,
    accuracy,
    cache_dir,
    digits_badnets_example,
    digits_image_to_tensor,
    digits_split,
    digits_tensor_to_image,
    load_bundled_example,
    sst2_rare_word_example,
    train_on_tensors,
)

# The names tests/scan/test_scan_model.py imports.
_digits = digits_split
train_classifier = train_on_tensors

__all__ = [
    "BUNDLED_EXAMPLES",
    "EXAMPLE_VERSION",
    "TEXT_EXAMPLE_VERSION",
    "TEXT_TRIGGER",
    "BundledExample",
    "DigitsExample",
    "TextExample",
    "TinyCNN",
    "accuracy",
    "cache_dir",
    "digits_badnets_example",
    "digits_image_to_tensor",
    "digits_split",
    "digits_tensor_to_image",
    "load_bundled_example",
    "sst2_rare_word_example",
    "train_classifier",
    "train_on_tensors",
]
