"""``load_detector`` beside the model: the embedded default, a saved folder, a folder that is not a detector, and the
module's imports (the model only, never the pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import metashield_hf
from metashield_hf import hub, loading
from metashield_hf.loading import DEFAULT_DETECTOR_DIR, load_detector


def test_default_and_saved_folder_round_trip(tmp_path):
    det = load_detector()
    assert Path(det.name_or_path) == DEFAULT_DETECTOR_DIR
    det.save_pretrained(tmp_path / "det")
    again = load_detector(tmp_path / "det")
    for (name, a), (_, b) in zip(det.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no config.json: it is not a saved MetaShield detector"):
        load_detector(tmp_path)


def test_same_objects_from_every_public_path():
    assert metashield_hf.load_detector is hub.load_detector is loading.load_detector
    assert metashield_hf.DEFAULT_DETECTOR_DIR == hub.DEFAULT_DETECTOR_DIR == DEFAULT_DETECTOR_DIR


def test_loading_imports_only_the_model():
    tree = ast.parse(Path(loading.__file__).read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert relative == {"modeling_metashield"}
