"""Flags into argument dataclasses (``--config`` YAML, positional first value) and the exit codes of a command."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import metashield_hf
from metashield_hf.arguments import parse_args, run_command


@dataclass
class _Args:
    positional: ClassVar[tuple[str, ...]] = ("name",)

    name: str | None = field(default=None, metadata={"help": "A name."})
    steps: int = field(default=3, metadata={"help": "Steps."})
    json: bool = field(default=False, metadata={"help": "Print JSON."})


def test_parse_args_reads_yaml_then_flags(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("name: from_yaml\nsteps: 7\n")
    assert parse_args(_Args, ["--config", str(run)]) == _Args(name="from_yaml", steps=7)
    assert parse_args(_Args, ["--config", str(run), "--steps", "9"]) == _Args(name="from_yaml", steps=9)
    assert parse_args(_Args, ["first", "--steps", "2"]) == _Args(name="first", steps=2)


def test_run_command_exit_codes_and_json(capsys):
    def job(args):
        if args.steps < 0:
            raise ValueError(f"steps must be >= 0, got {args.steps}")
        return {"steps": args.steps, "exit_code": 1 if args.steps > 5 else 0}

    assert run_command("demo", _Args, job, lambda r: print("shown", r["steps"]), ["--steps", "4"]) == 0
    assert capsys.readouterr().out == "shown 4\n"
    assert run_command("demo", _Args, job, print, ["--steps", "6", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"steps": 6}
    assert run_command("demo", _Args, job, print, ["--steps", "-1"]) == 2
    assert "metashield demo: error: steps must be >= 0, got -1" in capsys.readouterr().err
    assert run_command("demo", _Args, lambda args: None, print, []) == 0  # a non-main process prints nothing


def test_job_modules_do_not_import_the_cli():
    root = Path(metashield_hf.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                assert not any(n == "cli" or n.endswith(".cli") for n in names), f"{path} imports the CLI"
