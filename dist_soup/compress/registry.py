"""Codec names, their wire ids and their payload validators, and ``build``."""
from __future__ import annotations

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
        import inspect

        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"bad options {sorted(options)} for compressor {name!r}: {exc}; allowed: {allowed}") from None
    if error_feedback:
        from .feedback import ErrorFeedback

        stream = ErrorFeedback(stream)
    return stream
