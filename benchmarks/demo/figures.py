"""The figures of the bundled demos that the README, the Space README and the model card quote, in one file.

    python benchmarks/demo/figures.py                 # rerun the demos, write results/demo_figures.json
    python benchmarks/demo/figures.py --write_docs    # ... and rewrite the quoted figures from it (quotes.json)

Demos (each as its user runs it, on CPU):

- ``detect``: what ``metashield detect`` prints (``metashield_hf.cli.run_detect`` with its defaults: the bundled
  digits CNN with a BadNets patch, 20 clean samples, seed 0), and the same with ``--erase off`` and with
  ``--positives pseudo``;
- ``detect_draws``: the same model and options over ``--draws`` draws of the 20 clean samples (draw 0 is the
  command's own), because the FPR at the calibrated threshold moves with the clean samples given;
- ``space_scan``: the Space's scan tab with its defaults (the example's first 20 clean samples, 80 steps, seed 0) on
  ``digits-badnets`` and ``digits-clean``;
- ``space_check``: the Space's check tab with its defaults (the first 100 clean samples, target FPR 0.05, seed 0),
  scored on every held-out clean and triggered input of ``digits-badnets`` and, where ``sst2/train.csv`` is found,
  ``sst2-rare-word``.

``quotes.json`` lists where each figure is quoted: a file and a sentence whose ``{key:format}`` fields name a figure
(``{detect.default.tpr:.3f}``). ``--write_docs`` rewrites only those fields, keeping the sentence and its line breaks;
``tests/test_demo_figures.py`` fails when a quoted figure differs from the JSON or a sentence is no longer found.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parents[1]
RESULTS = HERE / "results" / "demo_figures.json"
QUOTES = HERE / "quotes.json"


@dataclass
class DemoFiguresArguments:
    """Flags of the demo-figures script."""

    draws: int = field(default=10, metadata={"help": "Draws of the 20 clean samples for detect_draws."})
    write_docs: bool = field(default=False, metadata={"help": "Rewrite the quoted figures listed in quotes.json."})
    docs_only: bool = field(
        default=False, metadata={"help": "Rewrite the quoted figures from the existing JSON without rerunning."}
    )


def _rates(shield, clean, triggered) -> dict:
    """TPR / FPR at the shield's threshold and the AUROC on held-out clean and triggered inputs."""
    import numpy as np

    from metashield_hf.evaluation.metrics import auroc, rates

    s_clean, s_trig = shield.score(clean), shield.score(triggered)
    scores = np.concatenate([s_clean, s_trig])
    labels = np.r_[np.zeros(len(s_clean)), np.ones(len(s_trig))]
    out = {k: round(float(v), 4) for k, v in rates(scores, labels, shield.threshold).items()}
    return out | {"auroc": round(float(auroc(scores, labels)), 4), "threshold": round(float(shield.threshold), 4)}


def detect_figures() -> dict:
    """``metashield detect`` as printed, with its defaults and with ``--erase off`` / ``--positives pseudo``."""
    from metashield_hf.cli import DetectArguments, run_detect

    out = {}
    for name, options in (("default", {}), ("erase_off", {"erase": "off"}), ("pseudo", {"positives": "pseudo"})):
        t0 = time.perf_counter()
        result = run_detect(DetectArguments(progress=False, **options))
        keep = ("tpr", "fpr", "auroc", "threshold", "erase_check", "positives", "model_clean_accuracy")
        out[name] = {k: result[k] for k in (*keep, "model_attack_success_rate", "n_clean_samples") if k in result}
        out[name]["held_out"] = {"clean": result["held_out_clean"]["n"], "triggered": result["triggered"]["n"]}
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
        logging.info("detect %s: %s", name, out[name])
    return out


def detect_draws(draws: int) -> dict:
    """The default ``metashield detect`` on the seed-0 model over ``draws`` draws of its 20 clean samples."""
    import numpy as np

    from metashield_hf import load_detector
    from metashield_hf.scan import ScanConfig
    from metashield_hf.zoo.examples import digits_badnets_example

    ex = digits_badnets_example(seed=0)
    detector = load_detector()
    rows = []
    for draw in range(draws):
        g = np.random.default_rng(draw)  # draw 0 is the command's own (its --seed 0)
        clean = ex.clean_pool[g.permutation(len(ex.clean_pool))[:20]]
        shield = detector.adapt(ex.model, clean, seed=0, synthesis=ScanConfig(progress=False))
        rows.append({"draw": draw, **_rates(shield, ex.test_clean, ex.test_triggered)})
    summary = {}
    for key in ("tpr", "fpr"):
        values = np.array([r[key] for r in rows])
        summary[key] = {
            "min": round(float(values.min()), 3),
            "median": round(float(np.median(values)), 3),
            "max": round(float(values.max()), 3),
        }
    return {"draws": draws, "summary": summary, "rows": rows}


def space_figures() -> dict:
    """The Space's scan and check tabs with their defaults on the bundled examples."""
    import torch

    from metashield_hf import load_detector, scan_model
    from metashield_hf.zoo.examples import load_bundled_example

    def batch(ex, items):
        return torch.stack(items) if ex.modality == "image" else items  # as the Space's _batch

    scans = {}
    for key in ("digits-badnets", "digits-clean"):
        ex = load_bundled_example(key)
        report = scan_model(ex.model, batch(ex, ex.clean_pool[:20]), steps=80, seed=0, progress=False)
        scans[key] = {
            "verdict": report.verdict,
            "score": round(float(report.score), 3),
            "threshold": round(float(report.threshold), 3),
            "suspected_target": report.suspected_target,
        }
    checks = {}
    detector = load_detector()
    for key in ("digits-badnets", "sst2-rare-word"):
        try:
            ex = load_bundled_example(key)
        except FileNotFoundError as e:  # the SST-2 example needs sst2/train.csv
            logging.warning("space_check %s skipped: %s", key, e)
            continue
        shield = detector.adapt(ex.model, batch(ex, ex.clean_pool[:100]), target_fpr=0.05, seed=0)
        checks[key] = {
            "n_clean": min(100, len(ex.clean_pool)),
            "held_out": {"clean": len(ex.test_clean), "triggered": len(ex.test_triggered)},
            **_rates(shield, batch(ex, ex.test_clean), batch(ex, ex.test_triggered)),
        }
    return {"scan": scans, "check": checks}


# ---- quotes: where each figure is written, and rewriting them ---------------------------------------------------
def _lookup(figures: dict, key: str):
    value = figures
    for part in key.split("."):
        value = value[part]
    return value


def quote_regex(sentence: str) -> tuple[re.Pattern, list[tuple[str, str]]]:
    """A regex for a quoted sentence (any run of whitespace matches any other, so line breaks may move) with one
    group per ``{key:format}`` field, and the fields."""
    parts, fields = [], []
    for literal, name, spec, _ in string.Formatter().parse(sentence):
        parts.append(r"\s+".join(re.escape(w) for w in re.split(r"\s+", literal)))
        if name is not None:
            parts.append(r"([-\w.]+)")
            fields.append((name, spec or ""))
    return re.compile("".join(parts)), fields


def rewrite_quotes(figures: dict, quotes: list[dict], repo: Path = REPO) -> list[str]:
    """Rewrite every quoted figure from ``figures`` in place; returns what changed (``file: old -> new``)."""
    changed = []
    for quote in quotes:
        path = repo / quote["file"]
        text = path.read_text(encoding="utf-8")
        regex, fields = quote_regex(quote["sentence"])
        matches = list(regex.finditer(text))
        if len(matches) != 1:
            raise ValueError(f"{quote['file']}: {len(matches)} matches for {quote['sentence']!r}; expected 1")
        match = matches[0]
        for i in reversed(range(len(fields))):  # right to left, so the earlier spans stay valid
            name, spec = fields[i]
            new = format(_lookup(figures, name), spec)
            if match.group(i + 1) != new:
                changed.append(f"{quote['file']}: {name} {match.group(i + 1)} -> {new}")
            text = text[: match.start(i + 1)] + new + text[match.end(i + 1) :]
        path.write_text(text, encoding="utf-8")
    return changed


def _commit() -> str | None:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return run.stdout.strip() if run.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (args,) = HfArgumentParser(DemoFiguresArguments).parse_args_into_dataclasses(argv)
    if not args.docs_only:
        t0 = time.perf_counter()
        figures = {
            "detect": detect_figures(),
            "detect_draws": detect_draws(args.draws),
            "space": space_figures(),
        }
        figures["run"] = {
            "commit": _commit(),
            "seconds": round(time.perf_counter() - t0, 1),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(REPO)}")
    if args.write_docs or args.docs_only:
        figures = json.loads(RESULTS.read_text())
        for line in rewrite_quotes(figures, json.loads(QUOTES.read_text())) or ["every quoted figure is current"]:
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
