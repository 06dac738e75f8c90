"""Codecs and error feedback for gradients: torch only, no distributed calls.

``build(name, **options)`` makes one compressor stream; see ``base.Compressor`` for the contract
and ``payload.Payload`` for the wire format. Layers, each importing only those below it:
``payload`` (the wire format and codec ids), ``base`` and ``feedback`` (the stream contract and
the error-feedback memory), the codecs (``cast``, ``qsgd``, ``adacomp``, ``sparse``), ``registry``.
"""

from .adacomp import AdaComp
from .base import Compressor, LinearCodec, NonFiniteInput
from .cast import BF16, FP16, Identity
from .feedback import ErrorFeedback, Residue
from .payload import Payload
from .qsgd import QSGD
from .registry import build, names
from .sparse import CLTK, RandomK, TopK

__all__ = [
    "AdaComp",
    "BF16",
    "CLTK",
    "Compressor",
    "ErrorFeedback",
    "FP16",
    "Identity",
    "LinearCodec",
    "NonFiniteInput",
    "Payload",
    "QSGD",
    "RandomK",
    "Residue",
    "TopK",
    "build",
    "names",
]
