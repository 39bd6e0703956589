"""Fixtures shared by the scan tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_models():
    """(backdoored example, clean example): the bundled digits TinyCNN with a BadNets patch (target 0), and the same
    recipe with no poisoning. Both are cached by `digits_badnets_example` (about a minute each the first time)."""
    from metashield_hf.zoo.examples import digits_badnets_example

    return digits_badnets_example(seed=0), digits_badnets_example(seed=0, poison_rate=0.0)


@pytest.fixture(scope="session")
def detector():
    """The embedded one-pass detector (what the scan and adaptation score activations with)."""
    from metashield_hf import load_detector

    return load_detector(one_pass=True)
