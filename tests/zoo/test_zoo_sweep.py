"""The resumable per-model loop over zoo rows that the benchmark probes share."""

from __future__ import annotations

import json

import torch

from metashield_hf.zoo import load_zoo, sweep_zoo_rows


def test_sweep_measures_each_model_once_and_resumes(tiny_zoo, tmp_path):
    out_dir, _, _ = tiny_zoo
    zoo = load_zoo(out_dir)
    calls = []

    def measure(adapter, inputs) -> dict:
        calls.append(len(inputs))
        with torch.no_grad():
            return {"classes": int(adapter(inputs).logits.shape[1])}

    out = tmp_path / "sub" / "probe.json"
    done = sweep_zoo_rows([out_dir], out, measure, domains=("cv",), workdir=tmp_path / "work", n_clean=3)
    cv = [r for r in zoo if r["domain"] == "cv"]
    assert sorted(done) == sorted(r["model_id"] for r in cv) and len(calls) == len(cv) and set(calls) == {3}
    rec = done[cv[0]["model_id"]]
    assert rec["zoo"] == out_dir.name and rec["classes"] == 10 and rec["seconds"] > 0
    assert rec["is_backdoored"] == bool(cv[0]["is_backdoored"]) and rec["attack"] == (cv[0]["attack"] or "none")
    assert json.loads(out.read_text()) == done  # written as it goes
    assert not any((tmp_path / "work").iterdir())  # each model's checkpoint is removed after its measurement
    # a second sweep finds everything done and measures nothing; another domain is measured then
    assert sweep_zoo_rows([out_dir], out, measure, domains=("cv",), workdir=tmp_path / "work") == done
    assert len(calls) == len(cv)
    more = sweep_zoo_rows([out_dir], out, measure, domains=("cv", "fl"), workdir=tmp_path / "work", n_clean=3)
    assert len(more) == len(cv) + sum(r["domain"] == "fl" for r in zoo)
