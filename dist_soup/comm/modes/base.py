"""What the three collectives share: the bucket work and its preparation, the mode's
accounting, packing payloads into one buffer and decoding what a rank received."""

from __future__ import annotations

import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import ClassVar

import torch

from ...compress.base import Compressor
from ...compress.payload import Payload
from ..buckets import Bucket
from ..stats import ExchangeStats
from ..transport import Transport, Work

Result = tuple[list[torch.Tensor], list[torch.Tensor] | None]


def outside_level() -> int:
    """The ``stacklevel`` that points a warning issued by the caller of this function at the
    first frame outside ``dist_soup.comm`` (the user's call), whatever the path through it."""
    comm = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(comm):
        frame, level = frame.f_back, level + 1
    return level


class RemoteNonFinite(Exception):
    """Some rank sent a non-zero status word: ``statuses[r]`` is rank r's (``i + 1``: its
    tensor i is not finite; ``REJECTED``: its input was refused)."""

    def __init__(self, statuses: list[int]) -> None:
        super().__init__(f"status words {statuses}")
        self.statuses = statuses


REJECTED = -1

STATUS_BYTES = 8  # one int64 after a rank's packed payloads


class DecodeError(ValueError):
    """A received payload that does not decode; ``sender`` is the rank it came from."""

    def __init__(self, message: str, sender: int) -> None:
        super().__init__(message)
        self.sender = sender


_DECODE_ERRORS = (ValueError, RuntimeError, IndexError, TypeError, OverflowError)


def _parse(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Payload:
    payload = Payload.from_bytes(buf)
    if tuple(payload.shape) != tuple(shape) or payload.dtype != dtype:
        raise ValueError(f"it declares shape {tuple(payload.shape)} {payload.dtype}, expected {tuple(shape)} {dtype}")
    return payload


def decode_payload(
    stream: Compressor, buf: torch.Tensor, *, sender: int, name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """Decode one received payload, or raise :class:`DecodeError` naming the sender and the tensor."""
    try:
        out = stream.decompress(_parse(buf, shape, dtype))
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"it decoded to shape {tuple(out.shape)}, expected {tuple(shape)}")
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"payload for {name!r} from rank {sender} failed to decode: {exc}", sender) from exc
    return out


def decode_mean(
    stream: Compressor,
    bufs: Sequence[torch.Tensor],
    *,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean of the payloads ``bufs[r]`` received from ranks ``r = 0, 1, ...``, in rank order
    (``Compressor.decompress_mean``: one pass where the codec fuses it), or :class:`DecodeError`
    naming the first sender whose payload does not decode. ``out``: where the mean is formed
    (the caller's memory, on the buffers' device), else a fresh tensor."""
    try:
        mean = stream.decompress_mean([_parse(b, shape, dtype) for b in bufs], out)
        if tuple(mean.shape) != tuple(shape):
            raise ValueError(f"it decoded to shape {tuple(mean.shape)}, expected {tuple(shape)}")
        return mean
    except _DECODE_ERRORS as exc:
        failure = exc
    for r, b in enumerate(bufs):  # find the sender: its payload alone fails
        decode_payload(stream, b, sender=r, name=name, shape=shape, dtype=dtype)
    raise DecodeError(f"payloads for {name!r} failed to decode together: {failure}", 0) from failure


def shares_memory(t: torch.Tensor, buffers: Sequence[torch.Tensor]) -> bool:
    """Whether ``t`` is a view of one of ``buffers`` (e.g. a decode that aliases a receive buffer)."""
    ptr = t.untyped_storage().data_ptr()
    return any(b.untyped_storage().data_ptr() == ptr for b in buffers if b.numel())


def owned(t: torch.Tensor, buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``t``, copied when it still shares memory with a receive buffer (so that a returned
    tensor never pins a whole bucket's buffer or changes under a later call)."""
    return t.clone() if shares_memory(t, buffers) else t


class BucketWork(ABC):
    @abstractmethod
    def finish(self, out: Sequence[torch.Tensor | None] | None = None) -> Result:
        """Wait for the bucket's collectives and return ``(means, locals)`` in entry order.

        ``out[i]`` (optional, the entry's shape, dtype and device) is memory the caller wants
        entry i's mean in: a mode may form the mean there directly (the returned tensor is
        then ``out[i]``), saving a copy; otherwise the caller copies."""

    @abstractmethod
    def _launched(self) -> list[Work]:
        """The transport operations this bucket has in flight."""

    def advance(self) -> None:
        """Launch the bucket's next round of collectives, if it has one (``two_phase``: phase 2),
        without waiting for it; :meth:`finish` does it otherwise. The exchange advances bucket
        j+1 before finishing bucket j, so j's decoding overlaps j+1's transfer."""
        return None  # one round (allgather, allreduce): nothing to launch early

    def abandon(self) -> None:
        """Let the launched collectives complete (their buffers must outlive them: MPI reads
        them in the background), issuing no new one; used when an earlier bucket failed."""
        for work in self._launched():
            try:
                work.wait()
            except Exception:  # the earlier failure is the one worth reporting
                pass


class Prepared:
    """A bucket whose first collectives may be in flight; ``launch()`` encodes and launches the
    rest and returns its :class:`BucketWork`; ``abandon()`` lets what was launched complete."""

    def __init__(self, launch: Callable[[], BucketWork], launched: Sequence[Work] = ()) -> None:
        self._launch = launch
        self._works = list(launched)

    def launch(self) -> BucketWork:
        return self._launch()

    def abandon(self) -> None:
        for work in self._works:
            try:
                work.wait()
            except Exception:  # the earlier failure is the one worth reporting
                pass


class Mode(ABC):
    """One way of running a compressed all-reduce over a bucket."""

    name: ClassVar[str]
    #: ``prepare`` only encodes (no collective), so the exchange may run it while its control
    #: collective is in flight (and roll the streams back if the control step fails).
    encodes_locally: ClassVar[bool] = False
    #: ``prepare(..., status=s)`` sends this rank's status word with the payload and ``finish``
    #: raises :class:`RemoteNonFinite` when some rank's is not 0, so a call on a layout the
    #: ranks have agreed on needs no control collective of its own.
    carries_status: ClassVar[bool] = False

    def __init__(
        self,
        transport: Transport,
        stats: ExchangeStats,
        stream: Callable[[str], Compressor],
        server: Callable[[str], Compressor],
    ) -> None:
        self.transport = transport
        self.stats = stats
        self.stream = stream
        self.server = server

    @abstractmethod
    def start(self, bucket: Bucket, tensors: Sequence[torch.Tensor], want_local: bool) -> BucketWork:
        """Encode ``tensors`` (one per bucket entry) and launch the bucket's collectives."""

    def prepare(self, bucket: Bucket, tensors: Sequence[torch.Tensor], want_local: bool) -> Prepared:
        """The part of :meth:`start` that needs only the inputs, launched now; ``launch()`` of
        the result does the rest. The exchange prepares bucket j+1 before launching bucket j, so
        small control collectives (e.g. QSGD's shared scales) do not queue behind bucket j's
        payload on the wire, and bucket j+1 is encoded while bucket j travels."""
        return Prepared(lambda: self.start(bucket, tensors, want_local))

    # --- accounting helpers -------------------------------------------------------------------
    @contextmanager
    def timed(self, field: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self.stats, field, getattr(self.stats, field) + time.perf_counter() - t0)

    def count(self, *, sent: int = 0, received: int = 0, overhead: int = 0, collectives: int = 0) -> None:
        if self.transport.world_size > 1:
            self.stats.bytes_sent += int(sent)
            self.stats.bytes_received += int(received)
            self.stats.overhead_bytes += int(overhead)
        self.stats.collectives += collectives

    def gather_padding(self, counts: Sequence[int]) -> int:
        return max(counts) - counts[self.transport.rank] if self.transport.pads_gather else 0

    def to_wire(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.transport.device else t.to(self.transport.device)

    def gather_sizes(self, sizes: Sequence[int]) -> list[list[int]]:
        """All-gather one int64 list per rank (same length everywhere); a control collective."""
        t = torch.tensor(list(sizes), dtype=torch.int64, device=self.transport.device)
        rows = self.transport.all_gather_v(t, [t.numel()] * self.transport.world_size)
        self.count(overhead=t.numel() * 8 + self.gather_padding([t.numel()] * self.transport.world_size), collectives=1)
        return [r.cpu().tolist() for r in rows]


def pack(payloads: Sequence[Payload | None], trailer: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate payloads into one CPU uint8 buffer (a None payload takes 0 bytes), followed
    by the int64 ``trailer`` when given."""
    sizes = [p.nbytes if p is not None else 0 for p in payloads]
    total = sum(sizes)
    buf = torch.empty(total + (STATUS_BYTES if trailer is not None else 0), dtype=torch.uint8)
    if trailer is not None:
        buf[total:].view(torch.int64)[0] = trailer
    off = 0
    for p, n in zip(payloads, sizes):
        if p is not None:
            p.write_into(buf[off : off + n])
        off += n
    return buf, sizes


def cut(buf: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    out, off = [], 0
    for n in sizes:
        out.append(buf[off : off + n])
        off += n
    return out
