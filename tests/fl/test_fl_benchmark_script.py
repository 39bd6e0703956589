"""`benchmarks/fl/run.py`, the one command behind `benchmarks/fl/results/screening.md`, at a tiny size (real MNIST,
real Flower rules)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from metashield_hf.zoo.build import resolve_data_root

MNIST = resolve_data_root() / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.exists(), reason=f"{MNIST} not found (set $METASHIELD_DATA)")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fl" / "run.py"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The script sets one torch thread for its whole process; the tests after it get the process back as it was
    (the Flower simulation test's screen flags other clients when it runs at one thread)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _load_script(monkeypatch):
    # Imported by name from a sys.path entry (not exec'd from its path), so that the spawned --jobs workers can
    # unpickle the script's functions: spawn hands sys.path to the children. Its name, ``run``, is generic: any
    # module of that name imported before is set aside, and this one is dropped again after the test.
    monkeypatch.delitem(sys.modules, SCRIPT.stem, raising=False)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    module = importlib.import_module(SCRIPT.stem)
    assert Path(module.__file__).resolve() == SCRIPT, module.__file__
    return module


@pytest.mark.slow
def test_parallel_settings_land_in_command_line_order_with_complete_counts(tmp_path, monkeypatch):
    bench = _load_script(monkeypatch)
    argv = ["--datasets", "mnist", "--algorithms", "fedprox", "fedavg", "--attacks", "model_replacement",
            "--warmup-rounds", "1", "--rounds", "2", "--train-size", "600", "--test-size", "200",
            "--scan-steps", "5", "--jobs", "2", "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "screening.json").read_text())
    assert result["complete"] is True
    # --jobs 2 finishes the settings in any order; the report keeps the command line's.
    assert [(s["dataset"], s["algorithm"]) for s in result["settings"]] == [("mnist", "fedprox"), ("mnist", "fedavg")]
    for setting in result["settings"]:
        assert (setting["rounds"], setting["malicious"], setting["warmup_rounds"]) == (2, 1, 1)
        attack = setting["attacks"]["model_replacement"]
        cpr = setting["clients_per_round"]
        for screen in ("metashield", "norm", "cosine", "krum", "multikrum", "bulyan"):
            r = attack["detection"][screen]
            # every update of every screened round is counted once: 1 attacker and cpr - 1 benign clients per round
            assert r["tp"] + r["fn"] == 2, (screen, r)
            assert r["fp"] + r["tn"] == 2 * (cpr - 1), (screen, r)
        assert set(attack["outcome"]) >= {"none", "metashield", "norm", "krum", "dp_fixed", "dp_adaptive"}
    markdown = (tmp_path / "screening.md").read_text()
    assert markdown.index("## mnist / fedprox") < markdown.index("## mnist / fedavg")
    assert "| model_replacement | " in markdown
    assert "Not in this run: femnist (`--datasets femnist`)." in markdown
