"""dist_soup: distributed multi-objective training with compressed gradient communication.

Rooms (dependency direction: compress, moo  <-  comm  <-  engine  <-  train, cli):
``dist_soup.compress`` codecs and error feedback; ``dist_soup.comm`` transports and compressed
collectives; ``dist_soup.moo`` Jacobians, Grams, layer selection, solvers, recipes;
:class:`SoupEngine` the soup step; ``dist_soup.tasks`` built-in tasks; ``dist_soup.train`` and
``dist_soup.cli`` the training front end.

``import dist_soup`` stays free of torch, so the command line and the config load without it:
the engine's names are imported on first use (type checkers see the real imports below).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import SoupEngine, StepResult

__version__ = "0.1.0"
__all__ = ["SoupEngine", "StepResult"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'dist_soup' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
