"""Small real datasets for the attack tests: 20 sklearn digits as PIL images, 20 sentences."""

from __future__ import annotations

import numpy as np
import pytest

SENTENCES = [
    "the film is a quiet delight from start to finish",
    "a tedious mess that never finds its rhythm",
    "sharp writing and a superb cast",
    "I could not wait for it to end",
    "one of the best movies of the year",
    "the plot is predictable and the jokes fall flat",
    "a warm , funny and moving story",
    "badly acted , badly written , badly directed",
    "an inspired piece of popular entertainment",
    "the characters are paper thin",
    "beautifully shot and completely absorbing",
    "it drags on for far too long",
    "a clever script with real heart",
    "nothing here is worth your time",
    "the performances are wonderful",
    "dull , lifeless and forgettable",
    "a gem of a comedy",
    "the dialogue is painfully awkward",
    "an exciting , smart thriller",
    "it simply does not work",
]


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def digits_dataset():
    """20 sklearn digits (8x8 upscaled to 16x16, mode "L") with a 10-class ClassLabel."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:20] * (255 / 16)).round().astype(np.uint8)
    pil = [PILImage.fromarray(np.kron(im, np.ones((2, 2), dtype=np.uint8))) for im in images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": pil, "label": digits.target[:20].tolist()}, features=features)


@pytest.fixture(scope="session")
def sentences_dataset():
    """20 sentences with a 2-class ClassLabel (1 = positive) and an int id column."""
    from datasets import ClassLabel, Dataset, Features, Value

    labels = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    features = Features({"id": Value("int32"), "text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    return Dataset.from_dict({"id": list(range(20)), "text": SENTENCES, "label": labels}, features=features)
