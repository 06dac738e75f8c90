"""What every compressor stream is, and the extra contract of codecs that can be summed.

A *stream* compresses one logical tensor over time (one parameter, one Jacobian row): the
stream owns whatever memory the codec needs between steps (an error-feedback residue, a step
counter for reproducible randomness) and exposes it through ``state_dict``. A stream knows
nothing about transport: ``dist_soup.comm`` decides where payloads go.

Randomness is counter-based: a stream built with ``seed``, ``rank`` and ``stream`` draws, at its
``step``-th call, from a key derived from ``(seed, rank, stream, step)``; the same run gives the
same bits, and resuming from a ``state_dict`` continues the same sequence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

from .payload import Payload

_MASK63 = (1 << 63) - 1
#: The dtypes every codec compresses.
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of decoded ``dtype`` values are formed: float32 (float64 for float64), so an
    average of half-precision decodes is rounded once, at the end."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_out(out: torch.Tensor, payload: Payload) -> None:
    """``out`` can hold the decode of ``payload`` in place (same dtype and number of values, contiguous)."""
    if out.dtype != payload.dtype or out.numel() != payload.numel or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {payload.dtype} tensor of {payload.numel} values, got "
            f"{out.dtype} of {out.numel()} values{'' if out.is_contiguous() else ', not contiguous'}"
        )


def flat_input(codec: str, g: torch.Tensor) -> torch.Tensor:
    """``g`` detached and flattened; ``TypeError`` or ``ValueError`` unless a floating tensor."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{codec} compresses a torch.Tensor, got {type(g).__name__}")
    if g.dtype not in FLOATS:
        raise ValueError(f"{codec} compresses floating tensors {FLOATS}, got {g.dtype}")
    return g.detach().reshape(-1)


# Option checks: ``what`` names the codec and the option ("topk ratio"); each returns the value.
def check_choice(what: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def check_int(what: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{what} must be an int {bound}, got {value!r}")
    return value


def check_fraction(what: str, value: Any) -> float:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def mix_key(*values: int) -> int:
    """A 63-bit key from a few integers (splitmix64 finaliser over a running combination)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


class NonFiniteInput(ValueError):
    """``compress`` was handed NaN or inf; the stream is left as it was before the call."""


class Compressor(ABC):
    """One compressor stream. Subclasses set ``name`` and implement ``compress``/``decompress``.

    ``seed``, ``rank`` and ``stream`` only matter to codecs that draw random numbers; every
    stream accepts them so callers can build any codec the same way. ``compress`` may update
    the stream's memory (residue, step); ``decompress`` never changes state, so a receiver can
    decode any number of payloads with one stream.
    """

    name: ClassVar[str] = ""
    #: The payload's size depends only on the input's shape and dtype (and the options), so every
    #: rank of a collective knows every other rank's size without asking (``allgather`` then
    #: skips its size exchange).
    fixed_size: bool = False
    #: ``compress`` raises :class:`NonFiniteInput` for every input holding NaN or inf, of any
    #: size (it looks at every value anyway, e.g. for its scales), so a caller needs no pass of
    #: its own to find them (the exchange skips its pre-pass on agreed layouts).
    rejects_nonfinite: bool = False

    def __init__(self, *, seed: int = 0, rank: int = 0, stream: int = 0) -> None:
        self.seed = int(seed)
        self.rank = int(rank)
        self.stream = int(stream)
        self.step = 0

    # --- the contract -------------------------------------------------------------------
    @abstractmethod
    def compress(self, g: torch.Tensor) -> Payload:
        """See the class docstring."""

    @abstractmethod
    def decompress(self, payload: Payload) -> torch.Tensor:
        """See the class docstring."""

    def decompress_mean(self, payloads: Sequence[Payload], out: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of the decodes of ``payloads`` (all of one tensor): summed in list order in
        :func:`acc_dtype`, divided by their count, cast to the payloads' dtype.

        Every rank of a collective averages the same payloads in the same order and must get
        the same bits, so a codec that fuses this (QSGD decodes and sums in one pass) performs
        the same float operations as this loop. ``out`` (contiguous, the payloads' dtype, as many
        values) receives the mean and is returned, reshaped to the payloads' shape: a codec that
        fuses writes there directly, which spares a fresh result and its copy.
        """
        if not payloads:
            raise ValueError("decompress_mean needs at least one payload")
        acc: torch.Tensor | None = None
        for p in payloads:
            d = self.decompress(p)
            acc = d.to(acc_dtype(d.dtype), copy=True) if acc is None else acc.add_(d)
        assert acc is not None
        mean = acc.div_(len(payloads)).to(payloads[0].dtype)
        if out is None:
            return mean
        check_out(out, payloads[0])
        return out.view(-1).copy_(mean.view(-1)).view(payloads[0].shape)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    # --- helpers for subclasses ---------------------------------------------------------
    def next_key(self) -> int:
        """Key for this call's random draws; advances the step counter."""
        key = mix_key(self.seed, self.rank, self.stream, self.step)
        self.step += 1
        return key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, rank={self.rank}, stream={self.stream})"


class LinearCodec(Compressor):
    """A codec whose encodings can be summed on the wire (``mode="allreduce"``).

    The collective runs, for one tensor ``g`` on each of P ranks::

        local, op = stream.agreement(g, rank, world_size)      # op: "max", "sum" or "leader"
        agreed = all_reduce(local, op)  (or broadcast from the leader)   # skipped if local is None
        wire = stream.encode_sum(g, agreed, world_size)         # a plain tensor
        total = all_reduce(wire, SUM)
        mean = stream.decode_sum(total, agreed, world_size)     # same on every rank

    ``decode_local(wire, agreed, world_size)`` decodes this rank's own ``wire`` as if it were
    alone, which is what error feedback subtracts. ``leader`` is the rank whose ``agreement``
    tensor is broadcast when ``op == "leader"``; with that op every rank (leader or not) returns
    a tensor of the same shape and dtype, the receive buffer of the broadcast.
    """

    def agreement(self, g: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, str] | None:
        return None

    def leader(self, world_size: int) -> int:
        return 0

    @abstractmethod
    def encode_sum(self, g: torch.Tensor, agreed: torch.Tensor | None, world_size: int) -> torch.Tensor:
        """See the class docstring."""

    @abstractmethod
    def decode_sum(self, total: torch.Tensor, agreed: torch.Tensor | None, world_size: int) -> torch.Tensor:
        """See the class docstring."""

    @abstractmethod
    def decode_local(self, wire: torch.Tensor, agreed: torch.Tensor | None, world_size: int) -> torch.Tensor:
        """See the class docstring."""

    def wire_nbytes(self, wire: torch.Tensor, agreed: torch.Tensor | None) -> int:
        """Bytes this rank contributes to the collectives for one tensor."""
        n = wire.numel() * wire.element_size()
        if agreed is not None:
            n += agreed.numel() * agreed.element_size()
        return n
