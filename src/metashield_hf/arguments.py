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

#: What ``--help`` says of the exit codes: one meaning each, so that a CI gate can read them.
EXIT_CODES = "exit codes: 0 success (scan: clean), 1 scan found a backdoor, 2 error (bad input, broken file, bad flag)"


def parse_args(cls: type, argv: list[str], prog: str | None = None) -> Any:
    """Parse ``argv`` into the dataclass ``cls`` with ``HfArgumentParser``.

    ``--config run.yaml`` alone reads every setting from the YAML; with other flags, the YAML gives the defaults and
    the flags override them. A command whose dataclass has its own ``config`` field (the zoo config of
    ``zoo build``) takes ``--config`` as that field instead. A dataclass with ``positional = ("name",)`` accepts its
    first value without the flag (``metashield scan CHECKPOINT ...``). ``prog`` names the command in the usage line
    (``metashield scan``); the help ends with the exit codes.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, prog=prog, epilog=EXIT_CODES)
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


logger = logging.getLogger(__name__)


def error_line(err: BaseException, limit: int = 400) -> str:
    """An exception as one line: ``Type: message`` (the type dropped for the plain errors of bad input), whitespace
    collapsed, cut at ``limit`` characters."""
    text = " ".join(str(err).split()) or repr(err)
    if not isinstance(err, (ValueError, OSError, KeyError)):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_command(name: str, cls: type, job: Callable[[Any], Any], show: Callable[[Any], None], argv: list[str]) -> int:
    """Parse ``argv`` into ``cls``, run ``job`` and print its result with ``show`` (or as JSON with ``--json``).

    Returns:
        The exit code: 0 on success, 2 on any error (a broken file, a shape mismatch, bad flags: printed on one line as
        ``metashield NAME: error: ...``, and with ``--json`` as ``{"error": ...}`` on stdout, so that no error reads
        as a finding), and a result's own ``exit_code`` where a command reports a finding (scan: 1 for a backdoored
        model). The traceback goes to the debug log.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(cls, argv, prog=f"metashield {name}")
        result = job(args)
    except Exception as err:  # every error is exit 2: a CI gate must never read a broken file as "backdoored"
        logger.debug("metashield %s failed", name, exc_info=True)
        line = error_line(err)
        print(f"metashield {name}: error: {line}", file=sys.stderr)
        if "--json" in argv:
            print(json.dumps({"error": line, "type": type(err).__name__}))
        return 2
    if result is None:  # a non-main process of a distributed job: the main process prints
        return 0
    code = result.pop("exit_code", 0) if isinstance(result, dict) else 0
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result)
    return code
