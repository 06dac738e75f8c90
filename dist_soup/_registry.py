"""Classes by name: the one registry behind codecs, solvers and tasks.

``build(name, **options)`` makes an instance and checks the options against the class's
keyword parameters first, so a typo fails with the list of what is allowed rather than with a
``TypeError`` from inside a constructor. An entry may be a class or ``"module:Class"``, imported
on first use (a task whose module loads scikit-learn costs nothing until it is asked for).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Collection, Mapping
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")


def keyword_options(cls: type, reserved: Collection[str] = ()) -> dict[str, Any]:
    """The keyword parameters of ``cls``'s constructor (but ``reserved``), in order, with their
    defaults (``inspect.Parameter.empty`` where required)."""
    params = inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
    return {
        p.name: p.default
        for p in params
        if p.name != "self" and p.name not in reserved and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


class Registry(Generic[T]):
    """Subclasses of ``base`` under their names.

    Args:
        kind: what the entries are ("solver", "task", ...), for messages.
        base: every entry must subclass it.
        entries: name -> class, or ``"module:Class"`` imported on first use.
        reserved: constructor parameters the owner passes, never the user (not options).
    """

    def __init__(
        self, kind: str, base: type, entries: Mapping[str, type[T] | str], *, reserved: Collection[str] = ()
    ) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, type[T] | str] = dict(entries)
        self.reserved = frozenset(reserved)

    def names(self) -> tuple[str, ...]:
        """The registered names, in the order they were registered."""
        return tuple(self._entries)

    def register(self, name: str, cls: type[T]) -> None:
        """Add ``cls`` under ``name`` (a new name only)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty str, got {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register({name!r}, ...) needs a subclass of {self.base.__qualname__}, got {cls!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = cls

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; ValueError listing the names otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} {name!r}: {entry} is not a subclass of {self.base.__qualname__}")
            entry = self._entries[name] = cast("type[T]", cls)
        return entry

    def options(self, name: str) -> dict[str, Any]:
        """:func:`keyword_options` of ``name``'s class: what a user may pass to :meth:`build`."""
        return keyword_options(self.get(name), self.reserved)

    def build(self, name: str, **options: Any) -> T:
        """A new ``name`` made with ``options``; unknown ones raise ValueError listing the allowed."""
        cls = self.get(name)
        allowed = self.options(name)
        unknown = sorted(set(options) - set(allowed) - self.reserved)
        if unknown:
            listing = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in allowed.items())
            raise ValueError(f"{self.kind} {name!r} got unknown options {unknown}; allowed: {listing or 'none'}")
        return cls(**options)
