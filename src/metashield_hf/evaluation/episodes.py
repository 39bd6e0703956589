"""Benchmark episodes kept one JSON line each, and their summary per domain, support size and method.

The input-detection benchmarks (``benchmarks/input_detection/*.py``) adapt a detector on many support draws of many
zoo models, each draw an *episode*. `EpisodeLog` appends every finished episode to a ``.jsonl`` file beside the
results, so an interrupted run resumes where it stopped and a rerun re-renders the tables without recomputing
anything; `summarize_episodes` reduces the episodes to the tables' cells.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["RATE_KEYS", "EpisodeLog", "summarize_episodes"]

#: What an episode's method entry holds for a backdoored model, averaged over backdoored episodes.
RATE_KEYS = ("tpr_at_5fpr", "auroc", "tpr_at_threshold")


class EpisodeLog:
    """The episodes of a results path (``<out>.jsonl``): read at start, appended to as each one finishes.

    An episode is a dict with at least ``model_id``, ``k`` and ``seed``.
    """

    def __init__(self, out: str | Path):
        self.path = Path(out).with_suffix(".jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.records: list[dict] = [json.loads(line) for line in lines if line.strip()]
        self._done = {(r["model_id"], r["k"], r["seed"]) for r in self.records}

    def todo(self, model_id: str, ks: Iterable[int], seeds: int) -> list[tuple[int, int]]:
        """The ``(k, seed)`` pairs of ``model_id`` not in the log yet."""
        return [(k, s) for k in ks for s in range(seeds) if (model_id, k, s) not in self._done]

    def add(self, record: dict) -> None:
        """Keep ``record`` and append it to the file (one line, flushed before the next episode starts)."""
        self.records.append(record)
        self._done.add((record["model_id"], record["k"], record["seed"]))
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def summarize_episodes(records: Sequence[dict], methods: Sequence[str], rate_keys: Sequence[str] = RATE_KEYS) -> dict:
    """Per ``"domain|k|method"`` (and ``"all|k|method"``): the mean of each of ``rate_keys`` over backdoored
    episodes, the FPR at the threshold's mean and 90th percentile over every episode, and the episode counts.

    Each record holds ``domain``, ``k``, ``is_backdoored`` and, per method it ran, ``{method: {"fpr_at_threshold",
    *rate_keys}}`` (rate keys only where the model has triggered inputs).
    """
    cells: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        for dom in (r["domain"], "all"):
            for m in methods:
                if m not in r:
                    continue
                c = cells[(dom, r["k"], m)]
                c["fpr"].append(r[m]["fpr_at_threshold"])
                if r["is_backdoored"] and rate_keys[0] in r[m]:
                    for key in rate_keys:
                        c[key].append(r[m][key])
    out = {}
    for (dom, k, m), c in sorted(cells.items()):
        out[f"{dom}|{k}|{m}"] = {
            **{key: float(np.mean(c[key])) for key in rate_keys if c[key]},
            "fpr_mean": float(np.mean(c["fpr"])),
            "fpr_p90": float(np.quantile(c["fpr"], 0.9)),
            "n_backdoored_episodes": len(c[rate_keys[0]]),
            "n_episodes": len(c["fpr"]),
        }
    return out
