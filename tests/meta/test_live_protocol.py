"""`metashield evaluate --protocol live`: a detector reading live probes is scored on the cached episodes' own rows,
computed from the zoo's live models, stored, and read back on a rerun."""

from __future__ import annotations

import json

import pytest
import torch

from metashield_hf import MetaShieldConfig, MetaShieldDetector
from metashield_hf.evaluation.protocols import PROTOCOLS, Evaluation
from metashield_hf.features import feature_names
from metashield_hf.probes import LiveEvidence


def _detector(path, probes):
    torch.manual_seed(0)
    names = feature_names() + LiveEvidence(probes).feature_names
    MetaShieldDetector(MetaShieldConfig(feature_names=names, probes=list(probes), adapt_steps=1)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def evaluation_of(tiny_cache, tmp_path_factory):
    zoo_dir, cache_dir, zoo = tiny_cache
    ids = sorted(zoo["model_id"])
    root = tmp_path_factory.mktemp("live_protocol")
    one_pass = _detector(root / "one_pass", ())
    live = _detector(root / "live", ("trajectory", "superimposition"))
    backdoored = [m for m in ids if "-none-" not in m]
    test_ids = sorted({*[m for m in backdoored if m.startswith("cv")][:1], *[m for m in backdoored if m.startswith("nlp")][:1],
                       *[m for m in ids if "-none-" in m][:1]})  # fmt: skip

    def make(out, detectors=None, zoo=str(zoo_dir)):
        return Evaluation(cache_dir, [m for m in ids if m not in test_ids], test_ids,
                          detectors or {"metashield": one_pass, "live": live}, out, seeds=1, k=(5,),
                          baselines=("mahalanobis", "strip"), zoo=zoo)  # fmt: skip

    return make, root


def test_live_protocol_scores_every_method_on_the_same_rows(evaluation_of):
    make, root = evaluation_of
    ev = make(root / "run")
    res = PROTOCOLS.get("live")(ev)
    records = res["sections"][0]["records"]
    by_method = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    assert set(by_method) == {"metashield", "metashield_live", "mahalanobis", "strip"}
    for rows in by_method.values():  # one record per held-out model, the same episode rows for every method
        assert len(rows) == len(ev.test_ids)
    for mid in ev.test_ids:
        eps = {(tuple(r["support"]), tuple(r["query_clean"]), tuple(r["query_triggered"]))
               for r in records if r["model_id"] == mid}  # fmt: skip
        assert len(eps) == 1
    for r in by_method["metashield_live"]:
        key = "auroc" if r["backdoored"] else "control_auroc"
        assert 0.0 <= r[key] <= 1.0 and 0.0 <= r["fpr"] <= 1.0
    stored = sorted((root / "run" / "live_episodes").rglob("*.pt"))
    assert len(stored) == len(ev.test_ids) and stored[0].parent.parent.name == "trajectory+superimposition-16"
    # a rerun reads the stored episodes back: same scores, and nothing is recomputed
    mtimes = [p.stat().st_mtime_ns for p in stored]
    again = [r for r in PROTOCOLS.get("live")(make(root / "run"))["sections"][0]["records"]
             if r["method"] == "metashield_live"]  # fmt: skip
    assert [p.stat().st_mtime_ns for p in stored] == mtimes
    for a, b in zip(again, by_method["metashield_live"], strict=True):
        assert a.get("auroc", a.get("control_auroc")) == b.get("auroc", b.get("control_auroc"))
    assert json.loads(json.dumps(records)) == records  # plain JSON types, as the report writes them


def test_live_protocol_needs_a_live_detector_and_the_zoo(evaluation_of, tmp_path):
    make, root = evaluation_of
    one_pass = str(root / "one_pass")
    assert "--live_detector" in PROTOCOLS.get("live")(make(tmp_path, {"metashield": one_pass}))["note"]
    assert "--zoo" in PROTOCOLS.get("live")(make(tmp_path, zoo=None))["note"]
    with pytest.raises(ValueError, match="reads no live probe"):
        PROTOCOLS.get("live")(make(tmp_path, {"metashield": one_pass, "live": one_pass}))
