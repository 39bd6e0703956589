"""Meta-training: MAML/FOMAML gradients, deterministic steps, resume, CLI, save/reload, and 2 CPU processes."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from metashield_hf import MetaShieldDetector
from metashield_hf.evaluation.held_out import evaluate_task, summarize
from metashield_hf.features import feature_names
from metashield_hf.meta.cache import load_tasks
from metashield_hf.meta.episodes import make_episode
from metashield_hf.meta.inner import inner_loop
from metashield_hf.meta.train import MetaTrainArguments, episode_loss, new_detector, train, weights_sha256

FAST = {"meta_batch": 2, "k_choices": "5,10", "n_query": 8, "inner_steps": 1, "checkpoint_every": 2}


def _args(out, cache_dir, **kwargs) -> MetaTrainArguments:
    return MetaTrainArguments(out=str(out), cache_dir=str(cache_dir), **{"steps": 2, **FAST, **kwargs})


def _grads(detector, loss):
    return torch.autograd.grad(loss, list(detector.parameters()), allow_unused=True)


def test_inner_loop_adapts_a_copy_and_maml_differs_from_fomaml(synthetic_task):
    ep = make_episode(synthetic_task(), 10, seed=0, n_query=8)
    det = new_detector(_args("unused", "unused"))
    before = weights_sha256(det)
    params = dict(det.named_parameters())
    adapted = inner_loop(det, params, ep.support, ep.inner_anomalies, ep.support, steps=2, lr=0.5)
    assert any(not torch.equal(adapted[n], p) for n, p in params.items()) and weights_sha256(det) == before

    grads = {}
    for algorithm in ("maml", "fomaml", "pooled"):
        args = _args("unused", "unused", algorithm=algorithm, inner_steps=2, inner_lr=0.5)
        grads[algorithm] = _grads(det, episode_loss(det, ep, args))
    flat = {a: torch.cat([x.flatten() for x in g if x is not None]) for a, g in grads.items()}
    assert all(torch.isfinite(f).all() for f in flat.values())
    assert not torch.allclose(flat["maml"], flat["fomaml"])  # second-order terms are there
    assert not torch.allclose(flat["fomaml"], flat["pooled"])  # and the inner loop matters


def test_outer_steps_decrease_the_query_loss(synthetic_task):
    torch.manual_seed(0)
    episodes = [make_episode(synthetic_task(seed=s), 10, seed=s, n_query=8) for s in range(2)]
    args = _args("unused", "unused", inner_steps=1)
    det = new_detector(args)
    opt = torch.optim.Adam(det.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.stack([episode_loss(det, ep, args) for ep in episodes]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_training_is_deterministic_and_reloads(tiny_cache, tmp_path):
    _, cache_dir, _ = tiny_cache
    a = train(_args(tmp_path / "a", cache_dir, steps=3))
    b = train(_args(tmp_path / "b", cache_dir, steps=3))
    assert a.weights_sha256 == b.weights_sha256 != weights_sha256(new_detector(_args("x", cache_dir)))
    assert a.steps == 3 and a.episodes == 6 and a.num_processes == 1 and a.episodes_per_s > 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == asdict(a)
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"]) and len(split["train"]) == a.train_models

    detector = MetaShieldDetector.from_pretrained(a.detector_dir)
    assert weights_sha256(detector) == a.weights_sha256
    assert detector.config.feature_names == feature_names()
    assert detector.num_parameters() < 100_000

    # the held-out models are scored the way deployment adapts (evaluate.py)
    held_out = load_tasks(cache_dir, split["test"])
    records = [evaluate_task(detector, task, k=10, steps=1) for task in held_out]
    assert all(0.0 <= r["fpr"] <= 1.0 for r in records)
    assert all("auroc" in r for r in records if r["is_backdoored"])
    assert set(summarize(records, by="domain")) >= {"all"}


def test_resume_continues_from_the_checkpoint(tiny_cache, tmp_path):
    _, cache_dir, _ = tiny_cache
    straight = train(_args(tmp_path / "straight", cache_dir, steps=4))
    out = tmp_path / "resumed"
    first = train(_args(out, cache_dir, steps=2))
    assert first.steps == 2 and (out / "checkpoints" / "step-00000002" / "complete").exists()
    resumed = train(_args(out, cache_dir, steps=4, resume=True))
    assert resumed.steps == 4 and resumed.episodes == 4  # only steps 3 and 4 ran
    assert resumed.weights_sha256 == straight.weights_sha256  # weights, Adam state and episode stream all restored
    with (out / "log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_cli_train(tiny_cache, tmp_path, capsys):
    from metashield_hf.cli import main

    _, cache_dir, _ = tiny_cache
    argv = ["train", "--cache_dir", str(cache_dir), "--out", str(tmp_path), "--steps", "1", "--meta_batch", "1"]
    assert main([*argv, "--k_choices", "5", "--n_query", "4", "--algorithm", "fomaml", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 1 and result["episodes_per_s"] > 0
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert "give --zoo" in capsys.readouterr().err


def _two_process_run(out: str, cache_dir: str) -> None:
    """Runs in each of the 2 processes debug_launcher forks."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)  # the fork inherits the pytest process's single-process state otherwise
    state = PartialState(cpu=True)
    rank, backend = state.process_index, dist.get_backend()
    result = train(_args(out, cache_dir, steps=2))
    record = {**asdict(result), "backend": backend}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.multiprocess
def test_two_cpu_processes_shard_tasks_and_stay_identical(tiny_cache, tmp_path):
    from accelerate import debug_launcher

    _, cache_dir, _ = tiny_cache
    debug_launcher(_two_process_run, args=(str(tmp_path), str(cache_dir)), num_processes=2)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["num_processes"] == r1["num_processes"] == 2 and r0["backend"] == "gloo"
    assert r0["weights_sha256"] == r1["weights_sha256"]  # the averaged meta-gradient keeps the replicas identical
    assert r0["episodes"] == 4  # meta_batch 2 = 1 episode per process per step
    saved = MetaShieldDetector.from_pretrained(r0["detector_dir"])
    assert weights_sha256(saved) == r0["weights_sha256"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_module(tiny_cache, tmp_path):
    """The documented command: accelerate launch --multi_gpu --num_processes 2 -m metashield_hf.meta.train."""
    from accelerate.test_utils import execute_subprocess_async, get_launch_command, get_torch_dist_unique_port

    _, cache_dir, _ = tiny_cache
    cmd = get_launch_command(
        multi_gpu=True,
        num_processes=2,
        num_machines=1,
        mixed_precision="no",
        dynamo_backend="no",
        main_process_port=get_torch_dist_unique_port(),
    )
    flags = ["--cache_dir", str(cache_dir), "--out", str(tmp_path), "--steps", "1", "--meta_batch", "2"]
    flags += ["--k_choices", "5", "--n_query", "4", "--inner_steps", "1", "--json"]
    # the interpreter's own bin first, so the `accelerate` script is found without an activated virtualenv
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PATH": path}
    execute_subprocess_async([*cmd, "-m", "metashield_hf.meta.train", *flags], env=env)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["episodes"] == 2
