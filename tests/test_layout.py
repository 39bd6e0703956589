"""The package's seams: no module imports another module's private names, and the public API is importable."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "metashield_hf"


def private_imports(path: Path, root: Path = SRC) -> list[str]:
    """``from X import _name`` statements of a module (``__future__`` and dunders aside), named relative to ``root``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(
                        f"{path.relative_to(root)}:{node.lineno} from {'.' * node.level}{node.module} import {alias.name}"
                    )
    return found


def test_no_module_imports_a_private_name_of_another():
    found = [line for path in sorted(SRC.rglob("*.py")) for line in private_imports(path)]
    assert not found, "\n".join(found)


def test_private_imports_are_found(tmp_path):
    (tmp_path / "m.py").write_text("from .other import public, _hidden\nfrom x import __version__\n")
    assert private_imports(tmp_path / "m.py", tmp_path) == ["m.py:1 from .other import _hidden"]


@pytest.mark.parametrize(
    "module", ["metashield_hf.scan", "metashield_hf.fl", "metashield_hf.zoo", "metashield_hf.evaluation"]
)
def test_subpackages_import_on_their_own(module):
    """In a fresh interpreter (this process has imported everything already), as ``python -c "import MODULE"``."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_public_api_names_the_entry_points_and_imports_flower_lazily():
    code = (
        "import sys, metashield_hf as m; "
        "assert 'flwr' not in sys.modules; "
        "names = {'scan_model', 'score_client_updates', 'load_detector', 'load_target', 'adapt', 'ScanConfig'}; "
        "assert names <= set(m.__all__) and 'MetaShieldStrategy' in m.__all__; "
        "assert 'fit_scan_head' not in m.__all__; "
        "m.MetaShieldStrategy; assert 'flwr' in sys.modules"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_cli_imports_neither_torch_nor_transformers():
    """``metashield --help`` parses flags only: the package and the CLI import their heavy parts when a job runs."""
    code = (
        "import sys, metashield_hf.cli; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'flwr', 'numpy'}); "
        "assert not heavy, heavy"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("package", ["metashield_hf", "metashield_hf.scan"])
def test_every_public_name_imports_from_its_lazy_package(package):
    code = (
        f"import importlib; package = importlib.import_module({package!r}); "
        "missing = [n for n in package.__all__ if n not in package._LAZY]; assert not missing, missing; "
        f"[exec(f'from {package} import {{name}}') for name in package.__all__]; "
        "assert set(package.__all__) <= set(dir(package))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
