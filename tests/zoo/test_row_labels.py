"""`row_labels`: what a zoo row is, as the benchmark tables group it."""

import pytest

from metashield_hf.zoo import row_labels


def test_row_labels_names_clean_models_none_and_keeps_the_target():
    clean = {"attack": None, "dataset": "mnist", "architecture": "test_resnet", "is_backdoored": 0, "target_label": -1}
    assert row_labels(clean | {"checkpoint": b"x"}) == {
        "attack": "none",
        "dataset": "mnist",
        "architecture": "test_resnet",
        "is_backdoored": False,
        "target_label": -1,
    }
    bd = row_labels(clean | {"attack": "sig", "is_backdoored": 1, "target_label": 3})
    assert bd["attack"] == "sig" and bd["is_backdoored"] is True and bd["target_label"] == 3


def test_row_labels_names_the_missing_column():
    with pytest.raises(KeyError, match="architecture"):
        row_labels({"attack": "sig", "dataset": "mnist", "is_backdoored": 1, "target_label": 3})
