"""A resumable per-model loop over zoo rows: run one measurement on every model of some zoos, one JSON file of
results keyed by ``model_id``, so that a long probe over many models picks up where it stopped."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .build import load_zoo, row_to_target
from .schema import row_labels, row_probe

__all__ = ["sweep_zoo_rows"]


def sweep_zoo_rows(
    zoos: Sequence[str | Path],
    out: str | Path,
    measure: Callable[[Any, list], dict],
    *,
    domains: Sequence[str] = ("cv", "fl"),
    datasets: Sequence[str] | None = None,
    workdir: str | Path = "artifacts/scan_work_probe",
    n_clean: int = 20,
) -> dict[str, dict]:
    """Run ``measure(adapter, clean_inputs)`` on every model of ``zoos`` not yet in ``out`` and return every result.

    Each model's record is ``{"zoo": <zoo folder name>, **row_labels(row), **measure(...), "seconds": ...}``, with
    ``clean_inputs`` the row's first ``n_clean`` probe inputs (the clean samples a scan reads). The JSON file is
    rewritten after every model, and the model's unpacked checkpoint under ``workdir`` removed, so an interrupted
    sweep resumes where it stopped and a finished one only reads the file.

    Args:
        zoos: zoo folders ([`load_zoo`]).
        out: the JSON file of results (created with its folder where missing).
        measure: what to run on one model: its target adapter and clean inputs in, a JSON-able dict out.
        domains: the zoo domains to measure.
        datasets: the datasets to measure (``None``: all).
        workdir: where checkpoints are unpacked.
        n_clean: clean probe inputs per model.
    """
    out = Path(out)
    done = json.loads(out.read_text()) if out.exists() else {}
    for zoo_dir in zoos:
        zoo = load_zoo(zoo_dir)
        todo = [
            i
            for i in range(len(zoo))
            if zoo[i]["domain"] in domains
            and (not datasets or zoo[i]["dataset"] in datasets)
            and zoo[i]["model_id"] not in done
        ]
        for i in tqdm(todo, desc=Path(zoo_dir).name, file=sys.stdout, mininterval=10):
            row = zoo[i]
            t = time.perf_counter()
            adapter = row_to_target(row, workdir)
            rec = {"zoo": Path(zoo_dir).name, **row_labels(row)}
            rec |= measure(adapter, row_probe(row)[0][:n_clean])
            rec["seconds"] = time.perf_counter() - t
            done[row["model_id"]] = rec
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(done, indent=1))
            shutil.rmtree(Path(workdir) / row["model_id"], ignore_errors=True)
    return done
