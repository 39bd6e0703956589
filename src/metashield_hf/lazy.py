"""Lazy package namespaces (PEP 562): a package maps each public name to the submodule that defines it, and the
submodule is imported when the name is first used, so importing the package (and the CLI's ``--help``) stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ["lazy_namespace"]


def lazy_namespace(
    package: str, table: Mapping[str, str], exported: Sequence[str], namespace: MutableMapping[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's module-level ``__getattr__`` and ``__dir__`` over ``table`` (name → relative module).

    ``__getattr__`` imports the module on the first access and stores the value in ``namespace`` (the package's
    ``globals()``), so every later access is a plain attribute lookup.

    Example:
        ```python
        __getattr__, __dir__ = lazy_namespace(__name__, {"adapt": ".shield"}, __all__, globals())
        ```
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exported})

    return __getattr__, __dir__
