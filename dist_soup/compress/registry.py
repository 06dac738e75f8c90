"""The codecs by name, and ``build``."""

from __future__ import annotations

import inspect
from typing import Any

from .adacomp import AdaComp
from .base import Compressor
from .cast import BF16, FP16, Identity
from .feedback import ErrorFeedback
from .qsgd import QSGD
from .sparse import CLTK, RandomK, TopK

# A codec's name is also its key in ``payload.CODEC_IDS`` (its wire id).
_CLASSES: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (Identity, FP16, BF16, QSGD, AdaComp, TopK, RandomK, CLTK)
}
#: Keyword arguments every stream takes from whoever owns the streams (an exchange gives each
#: rank and stream its own), not from the user: ``Compressor.__init__``'s parameters.
STREAM_ARGS: tuple[str, ...] = tuple(p for p in inspect.signature(Compressor.__init__).parameters if p != "self")


def names() -> list[str]:
    return sorted(_CLASSES)


def codec_class(name: str) -> type[Compressor]:
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; known: {', '.join(names())}") from None


def option_names(name: str) -> list[str]:
    """The options a user may give ``build(name, ...)``: the codec constructor's own parameters,
    in order, then ``error_feedback``; not the :data:`STREAM_ARGS` (seed, rank, stream)."""
    params = inspect.signature(codec_class(name).__init__).parameters.values()
    own = [
        p.name
        for p in params
        if p.name != "self" and p.name not in STREAM_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return own + ["error_feedback"]


def build(name: str, **options: Any) -> Compressor:
    """One compressor stream: ``build("qsgd", bits=4)``.

    ``error_feedback=True`` wraps any lossy codec in :class:`ErrorFeedback`.
    Unknown names and unknown options raise ``ValueError`` listing what is allowed.
    """
    error_feedback = options.pop("error_feedback", False)
    cls = codec_class(name)
    try:
        stream = cls(**options)
    except TypeError as exc:
        unknown = sorted(set(options) - set(option_names(name)) - set(STREAM_ARGS))
        raise ValueError(
            f"bad options {unknown or sorted(options)} for compressor {name!r}: {exc}; allowed: {option_names(name)}"
        ) from None
    if error_feedback:
        stream = ErrorFeedback(stream)
    return stream
