"""A name → constructor registry whose lookup errors list the valid names."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from kd_lightning.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            self._meta[name] = meta
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(self.unknown_message(name))
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries, n=3)
        suggestion = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return (
            f"Unknown {self.kind} {name!r}.{suggestion} Valid {self.kind}s: {', '.join(sorted(self._entries))}."
            + (f" {self.hint}" if self.hint else "")
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
