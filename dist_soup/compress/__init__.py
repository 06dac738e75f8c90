"""Codecs and error feedback for gradients: torch only, no distributed calls.

``build(name, **options)`` makes one compressor stream; see ``base.Compressor`` for the contract
and ``payload.Payload`` for the wire format.
"""
from .base import Compressor, LinearCodec
from .payload import Payload
from .registry import build, names
from . import cast  # noqa: F401  (registers identity, fp16, bf16)
from .qsgd import QSGD
from .feedback import ErrorFeedback
from .sparse import CLTK, RandomK, TopK
from .adacomp import AdaComp

__all__ = [
    "AdaComp",
    "CLTK",
    "Compressor",
    "ErrorFeedback",
    "LinearCodec",
    "Payload",
    "QSGD",
    "RandomK",
    "TopK",
    "build",
    "names",
]
