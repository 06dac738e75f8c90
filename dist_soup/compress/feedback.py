"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019) around any lossy codec.

The stream keeps a residue r (zero at first) of everything compression has lost so far::

    x = g + r
    p = C(x)
    r = x - D(p)

so the sum of what was sent over t steps differs from the sum of the inputs only by the current
residue: nothing is lost, only delayed. ``build(name, error_feedback=True)`` wraps a codec.

Around a :class:`~.base.LinearCodec` the wrapper is linear too (``mode="allreduce"``): it feeds
``x = g + r`` to the inner codec's agreement and ``encode_sum``, and sets ``r = x - D_local(wire)``
from the inner ``decode_local``, i.e. from what this rank itself contributed to the sum.

Memory must never absorb a NaN or inf (it would poison every later step): a non-finite input
raises ``ValueError`` before the residue is touched.

The memory is its own piece, :class:`Residue`: this wrapper keeps one, and so do the codecs
whose feedback is part of the codec (topk's built-in residue, cltk's low-pass memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Compressor, LinearCodec
from .payload import Payload


def check_finite(g: torch.Tensor, who: str) -> None:
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{who}: input holds non-finite values (NaN or inf); the residue was left unchanged")


class Residue:
    """The error-feedback memory (GRACE's ``Memory``), kept apart from any codec.

    ``x = memory.compensate(g)`` is ``g + r`` (at first a copy of g); after compressing x,
    ``memory.update(x, decoded)`` keeps ``r = x - decoded``, or with ``beta`` the low-pass
    ``r <- (1 - beta) r + beta (x - decoded)``. ``r`` is float32 (float64 for float64 inputs)
    and keeps the shape of the first input. A non-finite input, or one of another shape, raises
    ``ValueError`` naming ``owner`` before r changes.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tensor: torch.Tensor | None = None

    def compensate(self, g: torch.Tensor) -> torch.Tensor:
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{self.owner} compresses a torch.Tensor, got {type(g).__name__}")
        if not g.is_floating_point():
            raise ValueError(f"{self.owner} needs a floating tensor, got {g.dtype}")
        check_finite(g, self.owner)
        g = g.detach()
        if self.tensor is None:
            return g.to(torch.float64 if g.dtype == torch.float64 else torch.float32, copy=True)
        if self.tensor.shape != g.shape:
            raise ValueError(
                f"{self.owner} saw shape {tuple(self.tensor.shape)} before and now {tuple(g.shape)}; "
                "use one stream per tensor"
            )
        return self.tensor.to(g.device) + g

    def update(self, x: torch.Tensor, decoded: torch.Tensor, beta: float | None = None) -> None:
        err = x - decoded.reshape(x.shape).to(x.dtype)
        if beta is None:
            self.tensor = err
        elif self.tensor is None:
            self.tensor = beta * err
        else:
            self.tensor.mul_(1 - beta).add_(err, alpha=beta)

    def state(self) -> torch.Tensor | None:
        return None if self.tensor is None else self.tensor.clone()

    def load(self, r: Any) -> None:
        if r is not None and (not isinstance(r, torch.Tensor) or not r.is_floating_point()):
            raise ValueError(f"{self.owner} state: residue must be a floating tensor or None")
        self.tensor = None if r is None else r.clone()


class ErrorFeedback(Compressor):
    """Error-feedback stream around ``inner`` (a built codec stream without memory of its own).

    ``ErrorFeedback(stream)`` returns an instance of a linear subclass when ``stream`` is a
    :class:`LinearCodec`, so ``isinstance(ef, LinearCodec)`` tells a collective what it can do.
    The memory is a :class:`Residue`; ``residue`` is its tensor.
    """

    def __new__(cls, inner: Compressor):
        if cls is ErrorFeedback and isinstance(inner, LinearCodec):
            cls = LinearErrorFeedback
        return super().__new__(cls)

    def __init__(self, inner: Compressor) -> None:
        if not isinstance(inner, Compressor):
            raise TypeError(f"ErrorFeedback wraps a Compressor, got {type(inner).__name__}")
        if isinstance(inner, ErrorFeedback) or getattr(inner, "builtin_feedback", False):
            raise ValueError(
                f"{inner!r} already keeps an error-feedback memory; wrapping it again would count the "
                "error twice (for topk pass feedback=False to use this wrapper instead)"
            )
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # a wrapper's name is its codec's
        self.memory = Residue(repr(self))

    # seed/rank/stream/step belong to the inner codec (it draws the random numbers)
    seed = property(lambda self: self.inner.seed)
    rank = property(lambda self: self.inner.rank)
    stream = property(lambda self: self.inner.stream)

    @property
    def step(self) -> int:
        return self.inner.step

    @step.setter
    def step(self, value: int) -> None:
        self.inner.step = value

    fixed_size = property(lambda self: self.inner.fixed_size)
    residue = property(lambda self: self.memory.tensor)

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.inner!r})"

    def compress(self, g: torch.Tensor) -> Payload:
        x = self.memory.compensate(g)
        p = self.inner.compress(x.to(g.dtype))
        self.memory.update(x, self.inner.decompress(p))
        return p

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.inner.decompress(payload)

    def decompress_mean(self, payloads: Sequence[Payload], out: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.decompress_mean(payloads, out)

    def state_dict(self) -> dict[str, Any]:
        return {"residue": self.memory.state(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        memory = Residue(self.memory.owner)
        memory.load(state["residue"])  # checked before the inner state changes
        self.inner.load_state_dict(state["inner"])
        self.memory = memory


class LinearErrorFeedback(ErrorFeedback, LinearCodec):
    """Error feedback around a linear codec; the residue follows what this rank contributed."""

    inner: LinearCodec

    def agreement(self, g, rank, world_size):
        return self.inner.agreement(self.memory.compensate(g), rank, world_size)

    def leader(self, world_size: int) -> int:
        return self.inner.leader(world_size)

    def encode_sum(self, g, agreed, world_size):
        x = self.memory.compensate(g)
        wire = self.inner.encode_sum(x, agreed, world_size)
        self.memory.update(x, self.inner.decode_local(wire, agreed, world_size))
        return wire

    def decode_sum(self, total, agreed, world_size):
        return self.inner.decode_sum(total, agreed, world_size)

    def decode_local(self, wire, agreed, world_size):
        return self.inner.decode_local(wire, agreed, world_size)

    def wire_nbytes(self, wire, agreed):
        return self.inner.wire_nbytes(wire, agreed)
