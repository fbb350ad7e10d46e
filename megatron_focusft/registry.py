"""A registry of named records: the one lookup behind the attention backends
(attention/backends.py) and the segmentation methods (segment/registry.py).

Names are unique (registering one twice is an error); lookups of unknown names raise ValueError
listing the registered ones, in registration order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`kind` names the records in errors ("attention backend", "segmenter")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._records: dict[str, T] = {}

    def register(self, name: str, record: T) -> T:
        if name in self._records:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._records[name] = record
        return record

    def get(self, name: str) -> T:
        if name not in self._records:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
        return self._records[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._records)

    def __iter__(self) -> Iterator[T]:
        return iter(self._records.values())
