"""Plumbing of a meta-training run: the CSV tracker, the checkpointed loop counter, checkpoint folders, thread
count and a weights fingerprint. Kept apart so that train.py shows the loop itself."""

from __future__ import annotations

import csv
import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes and float32 bytes, in order)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class CSVTracker(GeneralTracker):
    """A dependency-free Accelerate tracker: one CSV row per logged step (TensorBoard is an optional extra)."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.path = Path(logging_dir) / f"{run_name}.csv"
        self._fields: list[str] | None = None

    @property
    def tracker(self):
        return self.path

    def log(self, values: dict, step: int | None = None, **kwargs):
        row = {"step": step, **values}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()  # on resume, rows are appended under the existing header
        if self._fields is None:
            self._fields = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


@dataclass
class TrainProgress:
    """The loop counter, checkpointed with the weights and optimizer so that ``--resume`` continues exactly."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``0``: unchanged), restoring torch's setting afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``<out>/checkpoints`` (``None`` if there is none)."""
    done = sorted((Path(out) / "checkpoints").glob("step-*/complete"))
    return done[-1].parent if done else None


def save_checkpoint(acc: Accelerator, out: Path, step: int, keep: int) -> None:
    folder = out / "checkpoints" / f"step-{step:08d}"
    acc.save_state(str(folder))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (folder / "complete").touch()  # written last: a crash mid-save leaves a folder resume ignores
        for old in sorted((out / "checkpoints").glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
