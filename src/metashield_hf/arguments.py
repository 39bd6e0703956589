"""Run one command from its flags: parse them into the command's argument dataclass, run the job, print the result.

Shared by the ``metashield`` CLI and the job modules that are also run as ``python -m`` (``meta.train`` under
``accelerate launch``), so a job module never imports the CLI that dispatches to it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any


def parse_args(cls: type, argv: list[str]) -> Any:
    """Parse ``argv`` into the dataclass ``cls`` with ``HfArgumentParser``.

    ``--config run.yaml`` alone reads every setting from the YAML; with other flags, the YAML gives the defaults and
    the flags override them. A command whose dataclass has its own ``config`` field (the zoo config of
    ``zoo build``) takes ``--config`` as that field instead. A dataclass with ``positional = ("name",)`` accepts its
    first value without the flag (``metashield scan CHECKPOINT ...``).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    if "config" in {f.name for f in fields(cls)}:
        return parser.parse_args_into_dataclasses(args=argv)[0]
    positional = getattr(cls, "positional", ())
    if positional and argv and not argv[0].startswith("-"):
        argv = [f"--{positional[0]}", *argv]
    if len(argv) == 2 and argv[0] == "--config":
        return parser.parse_yaml_file(argv[1])[0]
    if "--config" in argv:
        i = argv.index("--config")
        base = asdict(parser.parse_yaml_file(argv[i + 1])[0])
        parser.set_defaults(**base)
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(args=argv)[0]


def run_command(name: str, cls: type, job: Callable[[Any], Any], show: Callable[[Any], None], argv: list[str]) -> int:
    """Parse ``argv`` into ``cls``, run ``job`` and print its result with ``show`` (or as JSON with ``--json``).

    Returns:
        The exit code: 0 on success, 2 on bad input (the error is printed as ``metashield NAME: error: ...``), and a
        result's own ``exit_code`` where a command reports a finding (scan: 1 for a backdoored model).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(cls, argv)
        result = job(args)
    except (ValueError, OSError, KeyError) as err:
        print(f"metashield {name}: error: {err}", file=sys.stderr)
        return 2
    if result is None:  # a non-main process of a distributed job: the main process prints
        return 0
    code = result.pop("exit_code", 0) if isinstance(result, dict) else 0
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result)
    return code
