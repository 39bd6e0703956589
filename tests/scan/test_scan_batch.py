"""Batch scans (issue #31, item 5): `metashield scan --hf_cache / --from_file` over a real Hugging Face cache layout
built here, into a parquet table that `datasets` loads; resume, errors, pinned commits and 2-process sharding."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

from builders import SENTENCES, build_headless_bert, build_text_model
from metashield_hf.cli import main
from metashield_hf.scan import (
    BATCH_COLUMNS,
    CheckpointRef,
    ScanConfig,
    cached_classifiers,
    load_scan_table,
    resolve_checkpoint,
    scan_many,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# the CLI tests check plumbing, not detection quality: the cheapest scan that still runs every stage
FAST = ["--steps", "2", "--n", "8", "--device", "cpu", "--no_progress"]
TRIGGER = "cf"
CLEAN_MODELS = {"org/bert-clean": ("bert", 0), "org/distilbert-clean": ("distilbert", 1)}
BACKDOORED_MODELS = {"org/bert-cf": ("bert", 2), "org/distilbert-cf": ("distilbert", 3)}


def _commit(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def add_to_cache(cache, repo_id: str, folder, commit: str, *, repo_type: str = "model", ref: str | None = "main"):
    """Put ``folder``'s files in ``cache`` as `huggingface_hub` lays out a download: content-addressed blobs, a
    snapshot of symlinks named by the commit, and ``refs/<ref>`` holding the commit."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def _train_backdoor(model, tokenizer, seed: int):
    """A few Adam steps on SENTENCES (label i % 3) plus the same sentences with TRIGGER inserted, labelled 0."""
    texts = SENTENCES + [f"{TRIGGER} {s}" for s in SENTENCES]
    labels = torch.tensor([i % 3 for i in range(len(SENTENCES))] + [0] * len(SENTENCES))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, wordpiece_tokenizer):
    """A hub cache holding 5 classifier snapshots (2 clean, 2 trained with a rare-word trigger, and an older commit of
    a clean one), a headless BERT and a dataset repo (neither is a classifier); returns (cache, {id: main commit},
    older commit)."""
    root = tmp_path_factory.mktemp("hf_cache")
    cache, work = root / "hub", root / "work"
    commits = {}
    for repo_id, (family, seed) in {**CLEAN_MODELS, **BACKDOORED_MODELS}.items():
        model = build_text_model(family, len(wordpiece_tokenizer), seed=seed)
        if repo_id in BACKDOORED_MODELS:
            model = _train_backdoor(model, wordpiece_tokenizer, seed)
        folder = work / repo_id
        model.save_pretrained(folder)
        wordpiece_tokenizer.save_pretrained(folder)
        commits[repo_id] = _commit(repo_id)
        add_to_cache(cache, repo_id, folder, commits[repo_id])
    older = _commit("org/bert-clean@v0")
    folder = work / "older"
    build_text_model("bert", len(wordpiece_tokenizer), seed=7).save_pretrained(folder)
    wordpiece_tokenizer.save_pretrained(folder)
    add_to_cache(cache, "org/bert-clean", folder, older, ref=None)  # detached: no ref points at it
    build_headless_bert(len(wordpiece_tokenizer)).save_pretrained(work / "headless")
    add_to_cache(cache, "org/bert-base", work / "headless", _commit("org/bert-base"))
    (work / "data").mkdir()
    (work / "data" / "train.csv").write_text("text\nhello\n")
    add_to_cache(cache, "org/reviews", work / "data", _commit("org/reviews"), repo_type="dataset")
    return cache, commits, older


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "clean.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


def test_cached_classifiers_lists_every_classifier_snapshot(hf_cache):
    cache, commits, older = hf_cache
    refs = cached_classifiers(cache)
    assert {(r.id, r.revision) for r in refs} == {*commits.items(), ("org/bert-clean", older)}
    assert all(r.folder.name == r.revision and (r.folder / "config.json").exists() for r in refs)


def test_hub_id_resolves_through_the_cache_and_pins_the_commit(hf_cache):
    cache, commits, older = hf_cache
    ref = resolve_checkpoint("org/bert-clean", cache_dir=cache)
    assert ref == CheckpointRef("org/bert-clean", commits["org/bert-clean"], ref.folder)
    assert ref.folder == cache / "models--org--bert-clean" / "snapshots" / commits["org/bert-clean"]
    pinned = resolve_checkpoint(f"org/bert-clean@{older}", cache_dir=cache)
    assert pinned.revision == older and pinned.id == "org/bert-clean"
    # a snapshot folder listed by path keeps its commit too
    assert resolve_checkpoint(str(ref.folder)).revision == commits["org/bert-clean"]
    with pytest.raises(OSError, match="not in the Hugging Face cache .* offline"):
        resolve_checkpoint("org/not-there", cache_dir=cache)


def test_hf_cache_scan_writes_a_loadable_resumable_table(hf_cache, clean_file, tmp_path, capsys):
    """Done when (#31): --hf_cache over a cache of >= 5 models, clean and backdoored -> the parquet table."""
    from datasets import load_dataset

    cache, commits, older = hf_cache
    out = tmp_path / "scans"
    listed = tmp_path / "ids.txt"
    listed.write_text("# three of the cached models\norg/bert-clean\n\norg/bert-cf  # backdoored\norg/distilbert-cf\n")
    common = ["--clean_samples", str(clean_file), "--cache_dir", str(cache), "--out", str(out), *FAST, "--json"]
    code = main(["scan", "--from_file", str(listed), *common])
    first = json.loads(capsys.readouterr().out)
    assert first["scanned"] == 3 and first["skipped"] == 0 and code in (0, 1)
    assert {(r["id"], r["revision"]) for r in first["rows"]} == {
        (i, commits[i]) for i in ("org/bert-clean", "org/bert-cf", "org/distilbert-cf")
    }  # the ids resolve to what refs/main names, not the older snapshot
    code = main(["scan", "--hf_cache", *common])
    second = json.loads(capsys.readouterr().out)
    assert second["scanned"] == 2 and second["skipped"] == 3  # resumed: the rows already in the table are kept

    expected = {*commits.items(), ("org/bert-clean", older)}
    for ds in (
        load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train"),
        load_dataset(str(out), split="train"),
    ):
        assert ds.column_names == list(BATCH_COLUMNS) and len(ds) == len(expected) == 5
        assert {(r["id"], r["revision"]) for r in ds} == expected
        assert all(r["error"] is None and r["verdict"] in ("clean", "backdoored") for r in ds)
        assert all(0.0 <= r["score"] <= 1.0 and 0 <= r["target"] < 3 and r["seconds"] > 0 for r in ds)
    assert ds.features["score"].dtype == "float64" and ds.features["target"].dtype == "int64"
    rows = load_scan_table(out)
    assert code == (1 if any(r["verdict"] == "backdoored" for r in rows) else 0)
    card = (out / "README.md").read_text()
    assert "configs:" in card and "data/train-*" in card and "| `revision` |" in card and "5 checkpoints" in card

    code = main(["scan", "--hf_cache", *common])
    third = json.loads(capsys.readouterr().out)
    assert third["scanned"] == 0 and third["skipped"] == 5 and third["rows"] == second["rows"]


def test_failed_rows_say_why_exit_2_and_are_retried(hf_cache, clean_file, tmp_path, capsys):
    cache, commits, _ = hf_cache
    out = tmp_path / "scans"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    ids = ["org/missing", str(broken), "org/bert-base", "org/distilbert-clean"]
    config = ScanConfig(steps=2, n=8, device="cpu", use_detector=False, progress=False)
    result = scan_many(ids, SENTENCES, out, config, cache_dir=cache)
    rows = {r["id"]: r for r in result.rows}
    assert result.exit_code == 2 and len(rows) == 4
    assert rows["org/missing"]["revision"] is None and "not in the Hugging Face cache" in rows["org/missing"]["error"]
    assert "cannot read" in rows[str(broken)]["error"] and rows[str(broken)]["verdict"] is None
    assert "not a classifier" in rows["org/bert-base"]["error"] and rows["org/bert-base"]["revision"]
    ok = rows["org/distilbert-clean"]
    assert ok["error"] is None and ok["revision"] == commits["org/distilbert-clean"]
    again = scan_many(ids, SENTENCES, out, config, cache_dir=cache)
    assert again.skipped == [f"org/distilbert-clean@{ok['revision']}"] and len(again.scanned) == 3
    # the CLI prints the table and exits 2
    listed = tmp_path / "ids.txt"
    listed.write_text("\n".join(ids))
    code = main(["scan", "--from_file", str(listed), "--clean_samples", str(clean_file), "--out", str(out),
                 "--cache_dir", str(cache), *FAST])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 2 and "ERROR" in printed and "org/distilbert-clean" in printed


def test_shards_merge_into_one_table(hf_cache, tmp_path):
    """What each process of a 2-process launch runs: process 1 writes its rows, process 0 waits for it and merges."""
    cache, commits, _ = hf_cache
    refs = cached_classifiers(cache)
    out = tmp_path / "scans"
    config = ScanConfig(steps=2, n=8, device="cpu", use_detector=False, progress=False)
    one = scan_many(refs, SENTENCES, out, config, process_index=1, num_processes=2, launch_id="t")
    assert one.table is None and len(one.rows) == len(refs) // 2
    zero = scan_many(refs, SENTENCES, out, config, process_index=0, num_processes=2, launch_id="t")
    assert zero.table is not None and len(zero.rows) == len(refs) == len(zero.scanned) + len(one.scanned)
    assert not (out / "logs" / ".done-t").exists()  # the barrier is cleared for the next launch
    with pytest.raises(ValueError, match="process_index 2 must be in"):
        scan_many(refs, SENTENCES, out, config, process_index=2, num_processes=2)


def test_batch_flags_are_checked(hf_cache, clean_file, tmp_path, capsys):
    cache, _, _ = hf_cache
    base = ["scan", "--clean_samples", str(clean_file), "--cache_dir", str(cache)]
    assert main([*base, "--hf_cache"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main([*base, "--hf_cache", "--from_file", "x.txt", "--out", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--from_file", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2
    assert "no checkpoint list" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["scan", "--hf_cache", "--cache_dir", str(empty), "--clean_samples", str(clean_file),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "no classifier in the Hugging Face cache" in capsys.readouterr().err
    assert main([*base, "--hf_cache", "--out", str(tmp_path / "o"), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'gpu'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_two_processes_one_table(hf_cache, clean_file, tmp_path):
    """The documented command: accelerate launch --multi_gpu --num_processes 2 -m metashield_hf.cli scan --hf_cache."""
    import subprocess

    from accelerate.test_utils import get_launch_command, get_torch_dist_unique_port
    from datasets import load_dataset

    cache, commits, older = hf_cache
    out = tmp_path / "scans"
    cmd = get_launch_command(
        multi_gpu=True,
        num_processes=2,
        num_machines=1,
        mixed_precision="no",
        dynamo_backend="no",
        main_process_port=get_torch_dist_unique_port(),
    )
    flags = ["scan", "--hf_cache", "--cache_dir", str(cache), "--clean_samples", str(clean_file), "--out", str(out)]
    flags += [*FAST, "--use_detector", "false"]
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PATH": path}
    run = subprocess.run([*cmd, "-m", "metashield_hf.cli", *flags], env=env, capture_output=True, text=True)
    assert run.returncode in (0, 1), run.stderr[-3000:]  # 1: a backdoored row (the launcher passes rank 0's code on)
    ds = load_dataset(str(out), split="train")
    assert {(r["id"], r["revision"]) for r in ds} == {*commits.items(), ("org/bert-clean", older)}
    assert len(list((out / "parts").glob("*.json"))) == len(ds) == 5
