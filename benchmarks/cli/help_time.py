"""Wall time of ``metashield --help``, ``metashield detect --help`` and ``metashield scan --help``, each in a fresh
process, as a user at a terminal pays it (interpreter start, imports, parsing, printing).

    python benchmarks/cli/help_time.py --repeats 7 --label after

Runs the installed ``metashield`` console script (``python -m metashield_hf.cli`` where it is not on the PATH) once
as a warm-up per command (so the first run's cold file cache does not count), then ``--repeats`` times, and prints the
median. The figures of ``--label`` replace that label's entry in ``results/help_time.json`` (other labels are kept, so
a "before" and an "after" sit side by side) and ``results/help_time.md`` is rewritten from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COMMANDS = (["--help"], ["detect", "--help"], ["scan", "--help"])


def _launcher() -> list[str]:
    """The console script users run, or the module where the script is not installed."""
    script = shutil.which(
        "metashield", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    )
    return [script] if script else [sys.executable, "-m", "metashield_hf.cli"]


def time_command(launcher: list[str], args: list[str], repeats: int) -> list[float]:
    """Seconds of ``repeats`` fresh-process runs of ``launcher + args`` (after one untimed warm-up run)."""
    seconds = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        run = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300)
        elapsed = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"metashield {' '.join(args)} exited {run.returncode}: {run.stderr[-500:]}")
        if i:
            seconds.append(round(elapsed, 3))
    return seconds


def _commit() -> str | None:
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() if run.returncode == 0 else None


def write_markdown(results: dict, path: Path) -> None:
    """The table of ``results/help_time.json``: one row per command, one column per label (median seconds)."""
    labels = list(results)
    lines = [
        "# `metashield ... --help` wall time (median seconds over fresh processes)",
        "",
        "| command | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for args in COMMANDS:
        name = "metashield " + " ".join(args)
        cells = [f"{results[label]['commands'][name]['median_s']:.2f}" for label in labels]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "| label | commit | repeats | cpus | python |", "|---|---|---:|---:|---|"]
    for label, entry in results.items():
        lines.append(f"| {label} | {entry['commit']} | {entry['repeats']} | {entry['cpus']} | {entry['python']} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="Timed runs per command (after one warm-up).")
    parser.add_argument("--label", default="current", help="Name of this measurement in the results (before, after).")
    args = parser.parse_args(argv)

    launcher = _launcher()
    entry = {
        "commit": _commit(),
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commands": {},
    }
    for command in COMMANDS:
        name = "metashield " + " ".join(command)
        seconds = time_command(launcher, command, args.repeats)
        entry["commands"][name] = {"median_s": round(statistics.median(seconds), 3), "seconds": seconds}
        print(f"{name:<28} median {statistics.median(seconds):.2f} s  (runs {seconds})")

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "help_time.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[args.label] = entry
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / "help_time.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
