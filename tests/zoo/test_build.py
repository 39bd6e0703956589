"""The tiny zoo end to end: build -> finalize -> load_dataset -> rows back to targets -> ASR reproduced; resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from metashield_hf.zoo import (
    FEATURES,
    attack_success_rate,
    build_zoo,
    load_zoo,
    plan,
    row_probe,
    row_spec,
    row_to_target,
    write_checkpoint,
)
from metashield_hf.zoo.schema import HEAVY_COLUMNS

pytestmark = pytest.mark.slow


def test_tiny_zoo_builds_and_reloads(tiny_zoo, tiny_config):
    out, report, seconds = tiny_zoo
    assert report.planned == 12 and report.assigned == 12
    assert not report.failed, report.failed
    assert len(report.built) + len(report.rejected) == 12
    print(f"tiny zoo built in {seconds:.0f} s")  # a figure, not an assertion: timings belong to benchmarks
    zoo = load_zoo(out)
    rejected = {p.stem for p in (out / "rejected").glob("*.json")}
    assert len(zoo) == 12 - len(rejected) and len(zoo) >= 8
    assert zoo.features == FEATURES
    assert set(zoo["model_id"]) == {s.model_id for s in plan(tiny_config)} - rejected
    for row in zoo.select_columns([c for c in zoo.column_names if c not in HEAVY_COLUMNS]):
        if row["is_backdoored"]:
            assert row["attack_success_rate"] >= tiny_config.asr_min
        assert 0.0 <= row["clean_accuracy"] <= 1.0 and row["num_parameters"] > 0
    for reject in rejected:
        reason = json.loads((out / "rejected" / f"{reject}.json").read_text())
        assert reason["stage"] in ("asr_floor", "accuracy_floor") and "floor" in reason["reason"]


def _first(zoo, **match):
    for i in range(len(zoo)):
        meta = {k: zoo[i][k] for k in match}
        if meta == match:
            return zoo[i]
    return None


def test_rows_back_to_targets_reproduce_the_stored_asr(tiny_zoo, tmp_path):
    """The issue's "done when": two rows reloaded with load_dataset, loaded into targets, ASR re-measured."""
    out, _, _ = tiny_zoo
    zoo = load_zoo(out)
    rows = [_first(zoo, domain="cv", is_backdoored=True), _first(zoo, family="peft") or _first(zoo, domain="nlp")]
    rows.append(_first(zoo, domain="fl", is_backdoored=True) or _first(zoo, domain="fl"))  # a federated global model
    assert all(r is not None for r in rows)
    for row in rows:
        clean, triggered, labels = row_probe(row)
        assert len(clean) == len(triggered) == len(labels) == 128
        if row["is_backdoored"]:
            assert row["target_label"] not in labels
        target = row_to_target(row)
        predictions = target(triggered).logits.argmax(-1).numpy()
        asr = attack_success_rate(predictions, labels, row["target_label"])
        assert asr == pytest.approx(row["attack_success_rate"], abs=1e-6)
        assert row_spec(row).model_id == row["model_id"]
        # the trigger matters: on the clean probe the target is predicted far less often
        if row["is_backdoored"]:
            clean_hits = attack_success_rate(target(clean).logits.argmax(-1).numpy(), labels, row["target_label"])
            assert clean_hits < asr - 0.3, (row["model_id"], row["clean_accuracy"])


def test_peft_rows_point_at_their_own_base(tiny_zoo, tmp_path):
    zoo = load_zoo(tiny_zoo[0])
    row = _first(zoo, family="peft")
    if row is None:
        pytest.skip("no LoRA row passed the floors in this tiny build")
    folder = write_checkpoint(row, tmp_path / "ckpt")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((folder / "base").resolve())
    assert (folder / "base" / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    stored = json.loads(next(f["data"] for f in row["checkpoint"] if f["path"] == "adapter_config.json"))
    assert stored["base_model_name_or_path"] == "base"  # portable placeholder, rewritten on load
    target = row_to_target(row, workdir=tmp_path / "kept")
    assert (tmp_path / "kept" / row["model_id"] / "base").is_dir() and type(target).__name__ == "PeftAdapter"


def test_finalize_writes_hub_layout_card_and_report(tiny_zoo):
    import pyarrow.parquet as pq
    from datasets import get_dataset_config_names

    out, _, _ = tiny_zoo
    shards = sorted((out / "data").glob("train-*-of-*.parquet"))
    assert shards
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        assert all(meta.row_group(i).num_rows <= 16 for i in range(meta.num_row_groups))
    assert sorted(get_dataset_config_names(str(out))) == ["default", "metadata"]
    light = load_zoo(out, config_name="metadata")
    assert not set(HEAVY_COLUMNS) & set(light.column_names) and len(light) == len(load_zoo(out))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: metadata" in card and "| badnets |" in card
    report = (out / "zoo_report.md").read_text()
    assert "## Counts per domain × attack × architecture" in report and "| test_resnet |" in report
    assert "seconds per model" in report and "## Rejects" in report
    if any(r["domain"] == "fl" and r["is_backdoored"] for r in light):
        assert "## FL backdoor durability" in report


def test_report_durability_table_known_answer():
    from metashield_hf.zoo.schema import _durability_table

    def row(after, later, domain="fl", bd=True):
        extra = {"asr_after_attack": after, "asr_durability": later, "durability_rounds": 2}
        return {"domain": domain, "dataset": "mnist", "attack": "dba", "is_backdoored": bd,
                "extra_metrics": json.dumps(extra)}  # fmt: skip

    lines = _durability_table([row(0.9, 0.5), row(1.0, 0.7), row(0.1, 0.1, bd=False), row(0.2, 0.2, domain="cv")])
    assert "| mnist | dba | 2 | 2 | 0.900 / 0.950 / 1.000 | 0.500 / 0.600 / 0.700 |" in lines
    assert _durability_table([row(0.1, 0.1, bd=False)]) == []


def test_resume_skips_everything(tiny_zoo, tiny_config):
    out, first, _ = tiny_zoo
    start = time.perf_counter()
    again = build_zoo(tiny_config, out, progress=False)
    assert again.built == [] and not again.rejected and not again.failed
    assert sorted(again.skipped) == sorted(first.built + list(first.rejected))
    assert time.perf_counter() - start < 20


def test_shards_split_the_plan(tiny_zoo, tiny_config):
    out, _, _ = tiny_zoo
    specs = plan(tiny_config)
    second = build_zoo(tiny_config, out, process_index=1, num_processes=2, progress=False)
    assert second.assigned == 6 and second.skipped == [s.model_id for s in specs[1::2]]
    with pytest.raises(ValueError, match="process_index 2 must be in \\[0, 2\\)"):
        build_zoo(tiny_config, out, process_index=2, num_processes=2)


def test_cli_job_resumes_and_finalizes(tiny_zoo, tmp_path):
    from metashield_hf.zoo.cli_zoo import ZooBuildArguments, run_zoo_build

    tiny = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "tiny.yaml"  # not `from conftest`: 3 exist
    out, _, _ = tiny_zoo
    report = tmp_path / "reports" / "zoo.md"
    result = run_zoo_build(ZooBuildArguments(config=str(tiny), out=str(out), report=str(report), progress=False))
    assert result["built"] == 0 and result["accepted"] == len(load_zoo(out))
    assert report.read_text() == (out / "zoo_report.md").read_text()


def test_write_checkpoint_refuses_unsafe_paths(tmp_path):
    row = {"model_id": "m", "checkpoint": [{"path": "../escape.json", "data": b"{}"}]}
    with pytest.raises(ValueError, match="unsafe checkpoint path '../escape.json'"):
        write_checkpoint(row, tmp_path)
    with pytest.raises(ValueError, match="has no checkpoint files"):
        write_checkpoint({"model_id": "m", "checkpoint": []}, tmp_path)


def test_accuracy_floor_known_answer():
    from metashield_hf.zoo.build import accuracy_floor_rejects

    rows = [
        {"model_id": "c1", "dataset": "d", "architecture": "a", "is_backdoored": False, "clean_accuracy": 0.90},
        {"model_id": "c2", "dataset": "d", "architecture": "a", "is_backdoored": False, "clean_accuracy": 0.80},
        {"model_id": "c3", "dataset": "d", "architecture": "a", "is_backdoored": False, "clean_accuracy": 0.70},
        {"model_id": "p1", "dataset": "d", "architecture": "a", "is_backdoored": True, "clean_accuracy": 0.76},
        {"model_id": "p2", "dataset": "d", "architecture": "a", "is_backdoored": True, "clean_accuracy": 0.74},
        {"model_id": "p3", "dataset": "d", "architecture": "b", "is_backdoored": True, "clean_accuracy": 0.10},
    ]
    # median clean of (d, a) is 0.80; floor 0.75: c3 and p2 miss it; (d, b) has no clean model and is not judged
    rejects = accuracy_floor_rejects(rows, margin=0.05)
    assert sorted(rejects) == ["c3", "p2"] and "median clean d/a 0.800" in rejects["p2"]
    assert np.isclose(0.80 - 0.05, 0.75)


def test_chance_floor_rejects_collapsed_models():
    from metashield_hf.zoo.build import accuracy_floor_rejects

    # sst2 has 2 classes: chance 0.5, floor 0.6 with margin 0.1. Every clean model collapsed too (median 0.51, so the
    # median floor alone would accept the collapsed poisoned one with its meaningless ASR).
    rows = [
        {"model_id": "c1", "dataset": "sst2", "architecture": "a", "is_backdoored": False, "clean_accuracy": 0.51},
        {"model_id": "p1", "dataset": "sst2", "architecture": "a", "is_backdoored": True, "clean_accuracy": 0.50},
        {"model_id": "p2", "dataset": "sst2", "architecture": "b", "is_backdoored": True, "clean_accuracy": 0.62},
    ]
    assert accuracy_floor_rejects(rows, margin=0.05) == {}
    rejects = accuracy_floor_rejects(rows, margin=0.05, chance_margin=0.1)
    assert sorted(rejects) == ["c1", "p1"] and "< chance floor 0.600 (chance 0.500 + margin 0.1)" in rejects["p1"]
