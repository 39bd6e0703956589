"""Activation cache: every zoo model once, consistent tensors, and a rebuild computes only what is missing."""

from __future__ import annotations

import shutil

import torch

import metashield_hf.zoo
from metashield_hf.meta.cache import cache_activations, cache_path, load_task, load_tasks, read_meta


def test_cache_holds_every_model_with_consistent_activations(tiny_cache):
    _, cache_dir, zoo = tiny_cache
    ids = zoo.select_columns(["model_id"])["model_id"]
    assert sorted(p.stem for p in cache_dir.glob("*.safetensors")) == sorted(ids)
    for task in load_tasks(cache_dir, ids):
        n = len(task.clean)
        assert len(task.triggered) == n == len(task.labels) > 0
        assert task.head_weight.shape == (task.clean.logits.shape[1], task.clean.penultimate.shape[1])
        head = task.clean.penultimate @ task.head_weight.T + (0 if task.head_bias is None else task.head_bias)
        torch.testing.assert_close(head, task.clean.logits, atol=1e-3, rtol=1e-3)  # the head reproduces the logits
        row_meta = read_meta(cache_path(cache_dir, task.model_id))
        assert row_meta == task.meta and task.backdoored == (task.meta["attack"] != "none")


def test_rebuild_computes_only_missing_models(tiny_cache, tmp_path, monkeypatch):
    _, cache_dir, zoo = tiny_cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    ids = zoo.select_columns(["model_id"])["model_id"]
    missing = ids[1]
    cache_path(copy, missing).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.safetensors")}
    loaded = []
    real = metashield_hf.zoo.row_to_target
    monkeypatch.setattr(
        metashield_hf.zoo, "row_to_target", lambda row, *a, **kw: loaded.append(row["model_id"]) or real(row, *a, **kw)
    )

    paths = cache_activations(zoo, copy, progress=False)

    assert loaded == [missing]
    assert [p.stem for p in paths] == ids
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.safetensors") if p.stem != missing} == before
    again, original = load_task(cache_path(copy, missing)), load_task(cache_path(cache_dir, missing))
    torch.testing.assert_close(again.triggered.penultimate, original.triggered.penultimate)
    assert not list(copy.glob("*.tmp"))
