"""Evaluation protocols end to end on a small synthetic activation cache: shared episodes, report, PNGs, CLI errors."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
from safetensors.torch import save_file

from metashield_hf.cli import main
from metashield_hf.evaluation.protocols import PROTOCOLS, Evaluation, aggregate, parse_protocols, run_protocols
from metashield_hf.evaluation.training import group_columns
from metashield_hf.features import DEFAULT_GROUPS, build_reference, compute_features
from metashield_hf.meta.train import MetaTrainArguments, new_detector

ATTACKS = {"cv": ("badnets", "blend"), "nlp": ("rare_word",), "fl": ("fl_data_poisoning",)}
ARCHS = {"cv": ("test_resnet", "vit"), "nlp": ("bert", "roberta"), "fl": ("cnn_fedavg", "cnn_fedprox")}


def _write_task(cache, model_id, meta, *, n=40, dim=12, classes=3, seed=0):
    """One cache file in the format of `meta.cache.cache_activations`: triggered = clean shifted along a direction."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)
    clean = torch.randn(n, dim, generator=g)
    shift = (2.5 if meta["is_backdoored"] else 0.3) * torch.randn(1, dim, generator=g)
    trig = clean + shift
    tensors = {
        "clean_penultimate": clean,
        "clean_logits": clean @ w.T + b,
        "triggered_penultimate": trig,
        "triggered_logits": trig @ w.T + b,
        "labels": torch.zeros(n, dtype=torch.long),
        "head_weight": w,
        "head_bias": b,
    }
    save_file(tensors, str(cache / f"{model_id}.safetensors"), metadata={"meta": json.dumps(meta)})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A detector run folder (detector/, split.json, cache/) over 18 synthetic models of 3 domains."""
    root = tmp_path_factory.mktemp("evalrun")
    cache = root / "cache"
    cache.mkdir()
    train, test = [], []
    seed = 0
    for domain, attacks in ATTACKS.items():
        for i, attack in enumerate((*attacks, "none", "none")):
            for j, arch in enumerate(ARCHS[domain]):
                mid = f"{domain}-{arch}-{attack}-{i}{j}"
                meta = {"model_id": mid, "domain": domain, "architecture": arch, "attack": attack}
                meta["is_backdoored"] = attack != "none"
                _write_task(cache, mid, meta, seed=seed)
                seed += 1
                (test if j == 1 else train).append(mid)
    det_dir = root / "maml"
    torch.manual_seed(0)
    new_detector(MetaTrainArguments(out=str(det_dir), cache_dir=str(cache))).save_pretrained(det_dir / "detector")
    (det_dir / "split.json").write_text(json.dumps({"train": sorted(train), "test": sorted(test)}))
    return root


def _evaluation(run_dir, tmp_path, **kw) -> Evaluation:
    split = json.loads((run_dir / "maml" / "split.json").read_text())
    opts = {"seeds": 2, "steps": 2, "bank_size": 1, "few_shot_k": (5, 10), "heldout_architectures": ("vit",)}
    return Evaluation(
        run_dir / "cache",
        split["train"],
        split["test"],
        {"metashield": str(run_dir / "maml" / "detector")},
        tmp_path,
        baselines=("mahalanobis", "one_class_svm_psi", "strip"),
        **{**opts, **kw},
    )


def test_every_method_sees_the_same_episodes(run_dir, tmp_path):
    ev = _evaluation(run_dir, tmp_path)
    assert "strip" not in ev.baselines and any("strip" in n for n in ev.notes)  # needs the live model
    result = PROTOCOLS.get("in_domain")(ev)
    records = result["sections"][0]["records"]
    methods = {r["method"] for r in records}
    assert methods == {"metashield", "mahalanobis", "one_class_svm_psi"}
    episodes = defaultdict(set)
    for r in records:
        key = (r["model_id"], r["k"], r["seed"])
        episodes[key].add((tuple(r["support"]), tuple(r["query_clean"]), tuple(r["query_triggered"])))
    assert len(episodes) == len(ev.test_ids) * 2  # 1 k x 2 seeds
    assert all(len(v) == 1 for v in episodes.values())  # one episode per key, whatever the method
    first = next(iter(episodes.values())).pop()
    assert not set(first[0]) & set(first[1]) and not set(first[0]) & set(first[2])  # query never holds the support
    assert {r["seed"] for r in records} == {0, 1}
    # the held-out architecture part trains a detector without 'vit' and tests on every 'vit' model
    arch = result["sections"][2]["records"]
    assert {r["architecture"] for r in arch} == {"vit"} and "metashield[arch_holdout]" in {r["method"] for r in arch}
    fixed = json.loads((tmp_path / "detectors" / "arch_holdout" / "fixed_split.json").read_text())
    assert not any("-vit-" in m for m in fixed["train"])


def test_metrics_and_negative_control(run_dir, tmp_path):
    ev = _evaluation(run_dir, tmp_path, seeds=1)
    recs = ev.run(ev.comparison_methods(), ev.test_ids, [10])
    backdoored = [r for r in recs if r["backdoored"]]
    assert all(0.0 <= r["auroc"] <= 1.0 and len(r["roc"]) == 21 for r in backdoored)
    assert all("control_auroc" in r and "auroc" not in r for r in recs if not r["backdoored"])
    ms = [r for r in recs if r["method"] == "metashield"]
    assert all(0.0 <= r["fpr"] <= 1.0 for r in ms)
    # Mahalanobis separates a 2.5-sigma shift easily
    assert aggregate([r for r in backdoored if r["method"] == "mahalanobis"], "auroc")[0] > 0.9


def test_aggregate_is_mean_and_std_over_seeds():
    recs = [
        {"seed": 0, "model_id": "a", "auroc": 0.6},
        {"seed": 0, "model_id": "b", "auroc": 0.8},  # seed 0 mean 0.7
        {"seed": 1, "model_id": "a", "auroc": 0.9},
        {"seed": 1, "model_id": "b", "auroc": 0.9},  # seed 1 mean 0.9
    ]
    mean, std, n = aggregate(recs, "auroc")
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1) and n == 2


def test_dropping_a_group_is_selecting_its_columns():
    """Why a bank of all-group episodes can train the ablations: ψ of a subset of groups = a subset of columns."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(12, 10, generator=g), torch.randn(3, 10, generator=g)
    ref = build_reference(h[:8], h[:8] @ w.T, w, None)
    full = compute_features(h[8:], h[8:] @ w.T, ref, seed=3)
    keep = [x for x in DEFAULT_GROUPS if x != "topology"]
    assert torch.equal(compute_features(h[8:], h[8:] @ w.T, ref, keep, seed=3), full[:, group_columns(keep)])


@pytest.mark.slow
def test_cli_all_protocols_write_report_and_plots(run_dir, tmp_path, capsys):
    out, md = tmp_path / "report", tmp_path / "reports" / "benchmark.md"
    args = ["evaluate", "--protocol", "all", "--detector", str(run_dir / "maml" / "detector"), "--out", str(out)]
    args += ["--work_dir", str(tmp_path / "work"), "--report_md", str(md), "--seeds", "1", "--steps", "2"]
    args += ["--bank_size", "1", "--few_shot_k", "5,10", "--baselines", "mahalanobis,spectral_signatures"]
    args += ["--heldout_architectures", "vit"]
    assert main(args) == 0
    assert "MetaShield AUROC" in capsys.readouterr().out
    text = (out / "benchmark.md").read_text()
    for heading in ("## Headline", "## Analysis", "## Cost", "`cross_domain`", "`novel_attacks`", "`ablations`"):
        assert heading in text
    for png in ("few_shot_curve", "roc_curves", "cross_domain_heatmap", "ablation_bars", "group_transfer"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png}.png)" in text and f"](../report/{png}.png)" in md.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["headline"]) == {"cv", "fl", "nlp", "all"}
    assert len(summary["cross_domain_heatmap"]["rows"]) == 4 and len(summary["group_transfer"]) == len(DEFAULT_GROUPS)
    assert "no --zoo" in text.lower()  # the cost protocol says what it could not measure
    assert any(p.stat().st_size > 0 for p in (tmp_path / "work" / "records").glob("*.jsonl"))


def test_cli_bad_protocol_exits_2(run_dir, capsys):
    assert main(["evaluate", "--protocol", "in_domain,bogus", "--detector", str(run_dir / "maml" / "detector")]) == 2
    err = capsys.readouterr().err
    assert "unknown protocol 'bogus'" in err and "in_domain" in err and "'all'" in err
    assert main(["evaluate", "--protocol", "in_domain", "--k", "ten"]) == 2
    assert "--k must be comma-separated integers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown protocol"):
        parse_protocols("")


def test_detection_overhead_on_a_live_torch_model():
    from metashield_hf.evaluation.cost import detection_overhead
    from metashield_hf.targets import load_target

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
            self.fc = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.body(x))

    torch.manual_seed(0)
    detector = new_detector(MetaTrainArguments(out="unused", cache_dir="unused"))
    x = torch.randn(40, 8)
    res = detection_overhead(load_target(Net()), detector, x[:10], x[10:], repeats=1)
    assert res["n_inputs"] == 30 and res["overhead_ratio"] > 0 and res["adapt_s"] > 0
    assert res["detect_ms_per_input"] > 0 and res["forward_ms_per_input"] > 0


def test_run_protocols_times_each(run_dir, tmp_path):
    ev = _evaluation(run_dir, tmp_path, seeds=1)
    results = run_protocols(ev, ["few_shot"])
    assert results["few_shot"]["seconds"] > 0
    assert {r["k"] for r in results["few_shot"]["sections"][0]["records"]} == {5, 10}


def test_a_later_run_adds_protocols_to_the_report(run_dir, tmp_path, capsys):
    base = ["evaluate", "--detector", str(run_dir / "maml" / "detector"), "--out", str(tmp_path / "r")]
    base += ["--seeds", "1", "--baselines", "mahalanobis", "--heldout_architectures", ""]
    assert main([*base, "--protocol", "in_domain"]) == 0
    assert main([*base, "--protocol", "few_shot", "--few_shot_k", "5,10"]) == 0
    text = (tmp_path / "r" / "benchmark.md").read_text()
    assert "## Protocol `in_domain`" in text and "## Protocol `few_shot`" in text
    assert text.index("`in_domain`") < text.index("`few_shot`")  # registry order, whatever the run order
    assert text.count("`metashield evaluate") >= 2  # both commands are listed
    assert main([*base, "--protocol", "few_shot", "--few_shot_k", "5,10", "--merge", "false"]) == 0
    assert "## Protocol `in_domain`" not in (tmp_path / "r" / "benchmark.md").read_text()
