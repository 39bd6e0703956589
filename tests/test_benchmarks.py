"""The layout of ``benchmarks/``: one folder per study with a README that names the command and a ``results/`` folder,
an index that links every study, relative paths only, and scripts that call the public API and no other script."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
STUDIES = sorted(p for p in BENCHMARKS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
SCRIPTS = sorted([*BENCHMARKS.rglob("*.py"), *(REPO / "scripts").glob("*.py")])
BENCHMARK_SCRIPTS = [p for p in SCRIPTS if BENCHMARKS in p.parents]
FILES = sorted(p for p in BENCHMARKS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)

# An absolute path of one machine: /work/..., /root/..., /home/..., /tmp/... (not "artifacts/tmp/...").
ABSOLUTE_PATH = re.compile(rb"(?<![\w.~-])/(?:work|root|home|tmp)/")
# A command line in a README's fenced code block (an environment prefix such as JOBS=3 allowed).
COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:[A-Z_]+=\S+\s+)*(?:python|bash|metashield|accelerate)\s", re.M)
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def path_manipulations(tree: ast.AST) -> list[str]:
    """``sys.path.insert(...)`` / ``sys.path.append(...)`` / ``sys.path.extend(...)`` calls in a module."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("insert", "append", "extend")
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "path"
            and isinstance(node.func.value.value, ast.Name)
            and node.func.value.value.id == "sys"
        ):
            found.append(f"line {node.lineno}: sys.path.{node.func.attr}")
    return found


def script_imports(tree: ast.AST, script_names: set[str]) -> list[str]:
    """Imports of another script (by module name, or loaded from its file with importlib / runpy)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in script_names
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in script_names:
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("spec_from_file_location", "run_path", "SourceFileLoader"):
                found.append(f"line {node.lineno}: {name}(...)")
    return found


def private_imports(tree: ast.AST) -> list[str]:
    """Names starting with ``_`` imported from ``metashield_hf`` (a private module or a private name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "metashield_hf":
            private = [p for p in node.module.split(".") if p.startswith("_")]
            private += [a.name for a in node.names if a.name.startswith("_")]
            if private:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "metashield_hf" and any(p.startswith("_") for p in parts):
                    found.append(f"line {node.lineno}: import {a.name}")
    return found


def test_there_are_studies():
    assert {"input_detection", "meta"} <= {s.name for s in STUDIES}, [s.name for s in STUDIES]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_study_has_readme_with_command_and_results(study: Path):
    readme = study / "README.md"
    assert readme.is_file(), f"{_rel(study)}: no README.md (what it measures, the command, the table)"
    blocks = "\n".join(FENCE.findall(readme.read_text(encoding="utf-8")))
    assert COMMAND.search(blocks), f"{_rel(readme)}: no reproduce command (python/bash/metashield ...) in a code block"
    results = study / "results"
    assert results.is_dir(), f"{_rel(study)}: no results/ folder"
    assert any(p.is_file() for p in results.rglob("*")), f"{_rel(results)} is empty"


def test_index_links_every_study():
    index = (BENCHMARKS / "README.md").read_text(encoding="utf-8")
    links = set(LINK.findall(index))
    missing = [s.name for s in STUDIES if f"{s.name}/README.md" not in links]
    assert not missing, f"benchmarks/README.md links no README of {missing}"


@pytest.mark.parametrize("path", sorted(BENCHMARKS.rglob("*.md")), ids=_rel)
def test_relative_links_resolve(path: Path):
    text = path.read_text(encoding="utf-8")
    broken = [
        link
        for link in LINK.findall(text)
        if "://" not in link and not link.startswith("mailto:") and not (path.parent / link).exists()
    ]
    assert not broken, f"{_rel(path)}: links to missing files {broken}"


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_no_absolute_paths(path: Path):
    hits = sorted({m.group().decode() for m in ABSOLUTE_PATH.finditer(path.read_bytes())})
    assert not hits, f"{_rel(path)} holds absolute paths of one machine ({hits}); write repo-relative ones"


@pytest.mark.parametrize("path", SCRIPTS, ids=_rel)
def test_scripts_import_no_other_script(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = {p.stem for p in SCRIPTS} - {path.stem}
    found = path_manipulations(tree) + script_imports(tree, names)
    assert not found, f"{_rel(path)} reaches into another script: {found}; move shared code into metashield_hf"


@pytest.mark.parametrize("path", BENCHMARK_SCRIPTS, ids=_rel)
def test_benchmark_scripts_use_the_public_api(path: Path):
    found = private_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    assert not found, f"{_rel(path)} imports private names: {found}; benchmarks call only the public API"


def test_checks_catch_what_they_look_for():
    source = """
import sys
sys.path.insert(0, "scripts")
from scan_benchmark import refresh
import importlib.util
spec = importlib.util.spec_from_file_location("x", "scripts/x.py")
from metashield_hf.scan import _private, public
from metashield_hf._internal import thing
import metashield_hf.scan._impl
"""
    tree = ast.parse(source)
    assert path_manipulations(tree) == ["line 3: sys.path.insert"]
    assert script_imports(tree, {"scan_benchmark"}) == [
        "line 4: from scan_benchmark import ...",
        "line 6: spec_from_file_location(...)",
    ]
    assert [f.split(":")[0] for f in private_imports(tree)] == ["line 7", "line 8", "line 9"]
    assert not private_imports(ast.parse("from metashield_hf.meta.evaluate import evaluate_task"))
    assert ABSOLUTE_PATH.search(b"see /work/main/reports") and ABSOLUTE_PATH.search(b"(/tmp/x)")
    assert not ABSOLUTE_PATH.search(b"artifacts/tmp/x and benchmarks/meta/results")
    assert COMMAND.search("JOBS=3 bash benchmarks/x/run.sh\n") and not COMMAND.search("pip install x\n")
