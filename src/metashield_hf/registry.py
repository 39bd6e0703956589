"""Plain-dict registries filled by decorators (timm style).

One :class:`Registry` per extension kind: target adapters, feature groups, attacks, baselines. Names are
lower_snake_case and are the same strings used in CLI flags, zoo columns and report tables.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A named dict of extensions.

    Example:
        ```python
        ATTACKS = Registry("attack")

        @ATTACKS.register("badnets")
        class BadNets: ...

        ATTACKS.list("bad*")          # ['badnets']
        ATTACKS.build("badnets", patch_size=3, seed=None)   # None kwargs are dropped so defaults hold
        ```
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name or getattr(obj, "name", None) or obj.__name__.lower()  # type: ignore[attr-defined]
            if not _NAME.match(key):
                raise ValueError(f"{self.kind} name {key!r} must be lower_snake_case")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered (by {self._entries[key]!r})")
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._entries))}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Instantiate entry ``name``; keyword arguments that are ``None`` are dropped so defaults hold."""
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})  # type: ignore[operator]

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
