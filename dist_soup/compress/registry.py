"""Codec names, their wire ids and their payload validators, and ``build``."""
from __future__ import annotations

import inspect
from typing import Any

from .base import Compressor
from .payload import Payload, Validator

# Wire ids are part of the payload format: never renumber, only append.
CODEC_IDS: dict[str, int] = {
    "identity": 0,
    "fp16": 1,
    "bf16": 2,
    "qsgd": 3,
    "adacomp": 4,
    "topk": 5,
    "randomk": 6,
    "cltk": 7,
}
#: Keyword arguments every stream takes from whoever owns the streams (an exchange gives each
#: rank and stream its own), not from the user: ``Compressor.__init__``'s parameters.
STREAM_ARGS: tuple[str, ...] = tuple(p for p in inspect.signature(Compressor.__init__).parameters if p != "self")
_CLASSES: dict[str, type[Compressor]] = {}
_VALIDATORS: dict[int, Validator] = {}


def register(cls: type[Compressor], validator: Validator) -> type[Compressor]:
    """Make ``cls`` buildable by its ``name``; ``validator`` checks a payload's fields."""
    if cls.name not in CODEC_IDS:
        raise ValueError(f"codec {cls.name!r} has no wire id; add it to CODEC_IDS")
    _CLASSES[cls.name] = cls
    _VALIDATORS[CODEC_IDS[cls.name]] = validator
    return cls


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
    own = [p.name for p in params if p.name != "self" and p.name not in STREAM_ARGS
           and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return own + ["error_feedback"]


def codec_name_of(codec_id: int) -> str:
    for name, cid in CODEC_IDS.items():
        if cid == codec_id and name in _CLASSES:
            return name
    raise ValueError(f"payload codec id {codec_id} is unknown; known: {sorted(_VALIDATORS)}")


def validator_of(codec_id: int) -> Validator:
    codec_name_of(codec_id)
    return _VALIDATORS[codec_id]


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
        raise ValueError(f"bad options {unknown or sorted(options)} for compressor {name!r}: {exc}; "
                         f"allowed: {option_names(name)}") from None
    if error_feedback:
        from .feedback import ErrorFeedback

        stream = ErrorFeedback(stream)
    return stream
