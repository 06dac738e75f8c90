"""The codecs by name, and ``build``."""

from __future__ import annotations

from typing import Any

from .._registry import Registry, keyword_options
from .adacomp import AdaComp
from .base import Compressor
from .cast import BF16, FP16, Identity
from .feedback import ErrorFeedback
from .qsgd import QSGD
from .sparse import CLTK, RandomK, TopK

#: Keyword arguments every stream takes from whoever owns the streams (an exchange gives each
#: rank and stream its own), not from the user: ``Compressor.__init__``'s parameters.
STREAM_ARGS: tuple[str, ...] = tuple(keyword_options(Compressor))

# A codec's name is also its key in ``payload.CODEC_IDS`` (its wire id).
CODECS: Registry[Compressor] = Registry(
    "compressor",
    Compressor,
    {cls.name: cls for cls in (AdaComp, BF16, CLTK, FP16, Identity, QSGD, RandomK, TopK)},  # by name
    reserved=STREAM_ARGS,
)
names = CODECS.names
#: The class registered under a name (ValueError listing the names otherwise).
codec_class = CODECS.get


def option_names(name: str) -> list[str]:
    """The options a user may give ``build(name, ...)``: the codec constructor's own parameters,
    in order, then ``error_feedback``; not the :data:`STREAM_ARGS` (seed, rank, stream)."""
    return [*CODECS.options(name), "error_feedback"]


def build(name: str, **options: Any) -> Compressor:
    """One compressor stream: ``build("qsgd", bits=4)``.

    ``error_feedback=True`` wraps any lossy codec in :class:`ErrorFeedback`. Unknown names and
    unknown options raise ``ValueError`` listing what is allowed; the :data:`STREAM_ARGS` are
    accepted too (an exchange passes them).
    """
    error_feedback = options.pop("error_feedback", False)
    stream = CODECS.build(name, **options)
    return ErrorFeedback(stream) if error_feedback else stream
