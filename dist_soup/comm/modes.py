"""The three compressed collectives, one bucket at a time.

Each mode turns the P ranks' copies of one bucket of tensors ``g^p`` into the mean
``(1/P) sum_p C(g^p)`` that every rank then holds bit for bit, where ``C`` is the codec's
encode-then-decode (with whatever residue the stream keeps):

``allgather``
    every rank compresses each tensor with its own stream, the payloads of the bucket are
    concatenated, their sizes all-gathered (one int64 per tensor per rank), then the payloads
    all-gathered in one collective; every rank decodes all P payloads and averages them in rank
    order. Works for every codec. Per rank: sends S/rho, receives (P-1) S/rho.
``allreduce``
    linear codecs only (:class:`~dist_soup.compress.LinearCodec`): the codecs' agreement tensors
    are reduced (MAX or SUM, fused per op and dtype) or broadcast from their leader, every rank
    encodes against the agreed values, and the wire tensors of the bucket (fused per dtype) are
    summed in one all-reduce and decoded. Sends and receives about S/rho whatever P is.
``two_phase``
    the bucket is flattened and cut into P chunks; chunk j of every rank is compressed with that
    rank's stream for chunk j and sent to rank j (one all-to-all, sizes exchanged first); rank j
    decodes the P versions of its chunk, averages them, compresses the average with its own
    *server* stream (which keeps its own residue), and the P server payloads are all-gathered and
    decoded by everyone. Per rank: sends about S/rho (1 - 1/P) + S/(P rho), receives about
    2 S/rho (1 - 1/P): about twice the payload, whatever P is.

A mode's ``start`` encodes and launches the bucket's collectives and returns a
:class:`BucketWork`; its ``finish`` waits, decodes and returns ``(means, locals)``, where
``locals`` (when asked for) are this rank's own decoded contributions: what the other ranks
decode from it. Decoding a payload another rank sent never touches a stream's state.

Pipelining over the buckets of one call (the exchange drives it; every rank issues the same
collectives in the same order): ``prepare`` launches what needs only the inputs (allreduce: the
shared-scale agreement) for bucket j+1 before bucket j's payload goes out, so that small
collective does not queue behind the payload on the wire; ``start``/``launch`` returns with
the payload collective in flight, so bucket j+1 is encoded while bucket j travels;
``advance`` launches a later round (two_phase: phase 2) of bucket j+1 before bucket j is
decoded; ``allgather`` decodes this rank's own payload from its local bytes before waiting.
``finish(out)`` may form a mean directly in memory the caller supplies (the exchange's
``out=``, or the slice of a tensor cut into pieces), saving the copy.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterator, Sequence

import torch

from ..compress.base import Compressor, LinearCodec
from ..compress.payload import Payload
from .buckets import Bucket, chunk_bounds
from .stats import ExchangeStats
from .transport import Transport, Work

Result = tuple[list[torch.Tensor], list[torch.Tensor] | None]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Averages of half-precision decodes are formed in fp32, then cast once.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _outside_level() -> int:
    """The ``stacklevel`` that points a warning issued by the caller of this function at the
    first frame outside ``dist_soup.comm`` (the user's call), whatever the path through it."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
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


def decode_payload(stream: Compressor, buf: torch.Tensor, *, sender: int, name: str,
                   shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Decode one received payload, or raise :class:`DecodeError` naming the sender and the tensor."""
    try:
        payload = Payload.from_bytes(buf)
        if tuple(payload.shape) != tuple(shape) or payload.dtype != dtype:
            raise ValueError(
                f"it declares shape {tuple(payload.shape)} {payload.dtype}, expected {tuple(shape)} {dtype}"
            )
        out = stream.decompress(payload)
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"it decoded to shape {tuple(out.shape)}, expected {tuple(shape)}")
    except (ValueError, RuntimeError, IndexError, TypeError, OverflowError) as exc:
        raise DecodeError(f"payload for {name!r} from rank {sender} failed to decode: {exc}", sender) from exc
    return out


def _own(t: torch.Tensor, buffers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``t``, copied when it still shares memory with a receive buffer (so that a returned
    tensor never pins a whole bucket's buffer or changes under a later call)."""
    ptr = t.untyped_storage().data_ptr()
    if any(b.untyped_storage().data_ptr() == ptr for b in buffers if b.numel()):
        return t.clone()
    return t


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

    def __init__(self, transport: Transport, stats: ExchangeStats,
                 stream: Callable[[str], Compressor], server: Callable[[str], Compressor]) -> None:
        self.transport = transport
        self.stats = stats
        self.stream = stream
        self.server = server

    @abstractmethod
    def start(self, bucket: Bucket, tensors: Sequence[torch.Tensor], want_local: bool) -> BucketWork:
        """Encode ``tensors`` (one per bucket entry) and launch the bucket's collectives."""

    def prepare(self, bucket: Bucket, tensors: Sequence[torch.Tensor], want_local: bool) -> "Prepared":
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
        self.count(overhead=t.numel() * 8 + self.gather_padding([t.numel()] * self.transport.world_size),
                   collectives=1)
        return [r.cpu().tolist() for r in rows]


def _pack(payloads: Sequence[Payload | None], trailer: int | None = None) -> tuple[torch.Tensor, list[int]]:
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


def _cut(buf: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    out, off = [], 0
    for n in sizes:
        out.append(buf[off : off + n])
        off += n
    return out


# ------------------------------------------------------------------------------------------
class AllGather(Mode):
    name = "allgather"
    encodes_locally = True
    carries_status = True

    def start(self, bucket, tensors, want_local):
        return self.prepare(bucket, tensors, want_local).launch()

    def prepare(self, bucket, tensors, want_local, status=None):
        # Encoding needs no collective: it happens here, before the exchange's control check.
        with self.timed("encode_s"):
            streams = [self.stream(e.name) for e in bucket.entries]
            payloads = [s.compress(t) for s, t in zip(streams, tensors)]
            buf, sizes = _pack(payloads, trailer=status)
        fixed = all(s.fixed_size for s in streams)
        return Prepared(lambda: self._launch(bucket, buf, sizes, fixed, want_local, status is not None))

    def _launch(self, bucket, buf, sizes, fixed, want_local, trailed):
        extra = STATUS_BYTES if trailed else 0
        with self.timed("comm_s"):
            # Fixed-size payloads: every rank's sizes are this rank's (same codec, options and
            # tensors on every rank, which the exchange's control step checks), so no size exchange.
            rows = [list(sizes)] * self.transport.world_size if fixed else self.gather_sizes(sizes)
            counts = [sum(r) + extra for r in rows]
            work = self.transport.all_gather_v_async(self.to_wire(buf), counts)
        rank, P = self.transport.rank, self.transport.world_size
        self.count(sent=counts[rank] - extra, received=sum(counts) - counts[rank] - (P - 1) * extra,
                   overhead=self.gather_padding(counts) + P * extra, collectives=1)
        return _AllGatherWork(self, bucket, rows, buf, work, want_local, trailed)


def _shares(t: torch.Tensor, buffers: Sequence[torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(b.untyped_storage().data_ptr() == ptr for b in buffers if b.numel())


class _AllGatherWork(BucketWork):
    def __init__(self, mode: AllGather, bucket: Bucket, rows: list[list[int]], buf: torch.Tensor, work: Work,
                 want_local: bool, trailed: bool = False):
        self.mode, self.bucket, self.rows, self.work, self.want_local = mode, bucket, rows, work, want_local
        self.trailed = trailed
        self.buf = buf  # this rank's own packed payloads, the bytes it sent

    def _launched(self) -> list[Work]:
        return [self.work]

    def _decode_row(self, sender: int, buf: torch.Tensor) -> list[torch.Tensor]:
        m, b = self.mode, self.bucket
        return [decode_payload(m.stream(e.name), part, sender=sender, name=e.name, shape=e.shape, dtype=b.dtype)
                for e, part in zip(b.entries, _cut(buf, self.rows[sender]))]

    def finish(self, out=None) -> Result:
        m, b = self.mode, self.bucket
        P, rank = m.transport.world_size, m.transport.rank
        # This rank's own payloads decode from the local bytes while the gather is in flight.
        with m.timed("decode_s"):
            own = self._decode_row(rank, self.buf)
        with m.timed("comm_s"):
            pieces = [p.cpu() for p in self.work.wait()]
        if self.trailed:  # every rank reads the same words and takes the same decision
            statuses = [int(p[p.numel() - STATUS_BYTES :].clone().view(torch.int64)[0]) for p in pieces]
            if any(statuses):
                raise RemoteNonFinite(statuses)
        with m.timed("decode_s"):
            if P > 1 and not torch.equal(pieces[rank], self.buf):
                # What the others received differs from what was sent: decode the received
                # bytes like every other rank does, so all ranks raise (or agree) alike.
                own = self._decode_row(rank, pieces[rank])
            buffers = [*pieces, self.buf]
            acc_dtype = _acc_dtype(b.dtype)
            acc: list[torch.Tensor] = []
            first: list[torch.Tensor] = []
            for r in range(P):  # rank order on every rank: the same float sums everywhere
                row = own if r == rank else self._decode_row(r, pieces[r])
                if r == 0 and P > 1:
                    first = row
                    continue
                for i, d in enumerate(row):
                    if r > 1:
                        acc[i].add_(d)
                        continue
                    o = out[i] if out is not None else None
                    if o is not None and not (o.dtype == acc_dtype and o.device == d.device):
                        o = None
                    if r == 1:
                        # d0 + d1 formed straight in the caller's memory (or a new tensor).
                        d0 = first[i].to(acc_dtype)
                        acc.append(torch.add(d0, d, out=o.view(d.shape)) if o is not None else torch.add(d0, d))
                    elif o is not None:  # a group of one
                        acc.append(o.view(d.shape).copy_(d))
                    else:
                        # The only term is the mean: no copy unless it is a view of a receive
                        # buffer, this rank's returned local, or of another dtype.
                        reuse = d.dtype == acc_dtype and not self.want_local and not _shares(d, buffers)
                        acc.append(d if reuse else d.to(acc_dtype, copy=True))
            means = [(a.div_(P) if P > 1 else a).to(b.dtype).to(b.device) for a in acc]
            mine = [_own(d, buffers).to(b.device) for d in own] if self.want_local else None
        return means, mine


# ------------------------------------------------------------------------------------------
class AllReduce(Mode):
    name = "allreduce"
    _warned = False

    def start(self, bucket, tensors, want_local):
        return self.prepare(bucket, tensors, want_local).launch()

    def prepare(self, bucket, tensors, want_local):
        P, rank = self.transport.world_size, self.transport.rank
        streams: list[LinearCodec] = [self.stream(e.name) for e in bucket.entries]  # type: ignore[misc]
        with self.timed("encode_s"):
            asks = [s.agreement(t, rank, P) for s, t in zip(streams, tensors)]
        collect, launched = self._agree_async(streams, asks)
        return Prepared(lambda: self._launch(bucket, tensors, want_local, streams, collect()), launched)

    def _launch(self, bucket, tensors, want_local, streams, agreed):
        P = self.transport.world_size
        with self.timed("encode_s"):
            wires = [s.encode_sum(t, a, P) for s, t, a in zip(streams, tensors, agreed)]
            # Own decode first: the SUM below may run in place on a wire.
            mine = ([s.decode_local(w, a, P).reshape(e.shape).to(bucket.dtype).to(bucket.device)
                     for s, w, a, e in zip(streams, wires, agreed, bucket.entries)] if want_local else None)
            groups: dict[torch.dtype, list[int]] = {}
            for i, w in enumerate(wires):
                groups.setdefault(w.dtype, []).append(i)
            flats = {}
            for dtype, idx in groups.items():
                rdtype = self.transport.reduce_dtype(dtype)
                parts = [wires[i].reshape(-1) for i in idx]
                flats[dtype] = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(rdtype)
        self._warn_if_uncompressed(bucket, flats.values())
        launched = []
        with self.timed("comm_s"):
            for dtype, flat in flats.items():
                n = flat.numel() * flat.element_size()
                launched.append((dtype, self.transport.all_reduce_async_(flat, "sum")))
                self.count(sent=n, received=n, collectives=1)
        return _AllReduceWork(self, bucket, streams, wires, agreed, groups, launched, mine)

    def _warn_if_uncompressed(self, bucket: Bucket, flats) -> None:
        """Integer level sums as wide as the input save nothing (QSGD 8-bit on gloo sums int32
        levels: gloo has no int16 reduction): say so once per exchange, it is legal but slow."""
        if self._warned:
            return
        width = torch.empty(0, dtype=bucket.dtype).element_size()
        for flat in flats:
            if not flat.is_floating_point() and flat.element_size() >= width:
                self._warned = True
                warnings.warn(
                    f"mode='allreduce' sums this codec's integer levels as {flat.dtype} on this transport "
                    f"({self.transport!r}), as wide as the {bucket.dtype} input: no compression at all. "
                    "Use mode='allgather' or 'two_phase', or fewer levels (e.g. bits=4 for qsgd), or "
                    "wire_int16=True on NCCL (gloo cannot sum int16)",
                    RuntimeWarning, stacklevel=_outside_level(),
                )
                return

    def _agree_async(self, streams: Sequence[LinearCodec], asks: Sequence[tuple[torch.Tensor, str] | None]
                     ) -> tuple[Callable[[], list[torch.Tensor | None]], list[Work]]:
        """Launch the reductions or broadcasts of the codecs' agreement tensors, fused per
        (op, dtype, leader); returns (a function that waits and gives the agreed tensors, the
        operations launched)."""
        P, rank = self.transport.world_size, self.transport.rank
        groups: dict[tuple[str, torch.dtype, int], list[int]] = {}
        for i, ask in enumerate(asks):
            if ask is None:
                continue
            t, op = ask
            if op not in ("max", "sum", "leader"):
                raise ValueError(f"codec agreement op {op!r} is not one of 'max', 'sum', 'leader'")
            leader = streams[i].leader(P) if op == "leader" else -1
            groups.setdefault((op, t.dtype, leader), []).append(i)
        pending = []
        with self.timed("comm_s"):
            for (op, dtype, leader), idx in groups.items():
                parts = [asks[i][0].reshape(-1) for i in idx]  # type: ignore[index]
                flat = torch.cat(parts).to(self.transport.reduce_dtype(dtype))
                n = flat.numel() * flat.element_size()
                if op == "leader":
                    work = self.transport.broadcast_async_(flat, leader)
                    self.count(sent=n if rank == leader else 0, received=0 if rank == leader else n, collectives=1)
                else:
                    work = self.transport.all_reduce_async_(flat, op)
                    self.count(sent=n, received=n, collectives=1)
                pending.append((dtype, idx, work))

        def collect() -> list[torch.Tensor | None]:
            agreed: list[torch.Tensor | None] = [None] * len(asks)
            with self.timed("comm_s"):
                for dtype, idx, work in pending:
                    flat = work.wait()
                    off = 0
                    for i in idx:
                        t = asks[i][0]  # type: ignore[index]
                        agreed[i] = flat[off : off + t.numel()].to(dtype).reshape(t.shape)
                        off += t.numel()
            return agreed

        return collect, [w for _, _, w in pending]


class _AllReduceWork(BucketWork):
    def __init__(self, mode, bucket, streams, wires, agreed, groups, launched, mine):
        self.mode, self.bucket, self.streams, self.wires = mode, bucket, streams, wires
        self.agreed, self.groups, self.launched, self.mine = agreed, groups, launched, mine

    def _launched(self) -> list[Work]:
        return [w for _, w in self.launched]

    def finish(self, out=None) -> Result:
        m, b = self.mode, self.bucket
        P = m.transport.world_size
        totals: dict[int, torch.Tensor] = {}
        with m.timed("comm_s"):
            done = [(dtype, work.wait()) for dtype, work in self.launched]
        with m.timed("decode_s"):
            for dtype, flat in done:
                off = 0
                for i in self.groups[dtype]:
                    n = self.wires[i].numel()
                    totals[i] = flat[off : off + n].to(dtype).reshape(self.wires[i].shape)
                    off += n
            means = []
            for i, e in enumerate(b.entries):
                mean = self.streams[i].decode_sum(totals[i], self.agreed[i], P)
                means.append(mean.reshape(e.shape).to(b.dtype).to(b.device))
        return means, self.mine


# ------------------------------------------------------------------------------------------
class TwoPhase(Mode):
    name = "two_phase"

    def start(self, bucket, tensors, want_local):
        P, rank = self.transport.world_size, self.transport.rank
        with self.timed("encode_s"):
            flats = [t.detach().reshape(-1) for t in tensors]
            flat = torch.cat(flats) if len(flats) > 1 else flats[0]
            bounds = chunk_bounds(bucket.numel, P)
            payloads = [
                self.stream(f"{bucket.key}/chunk{j}").compress(flat[o : o + n]) if n else None
                for j, (o, n) in enumerate(bounds)
            ]
            buf, send = _pack(payloads)
        with self.timed("comm_s"):
            sizes = torch.tensor(send, dtype=torch.int64, device=self.transport.device)
            recv = [int(x) for x in torch.cat(self.transport.all_to_all_v(sizes, [1] * P, [1] * P)).cpu().tolist()]
            self.count(overhead=8 * (P - 1), collectives=1)
            work = self.transport.all_to_all_v_async(self.to_wire(buf), send, recv)
        self.count(sent=sum(send) - send[rank], received=sum(recv) - recv[rank], collectives=1)
        return _TwoPhaseWork(self, bucket, bounds, payloads, work, want_local)


class _TwoPhaseWork(BucketWork):
    def __init__(self, mode, bucket, bounds, payloads, work, want_local):
        self.mode, self.bucket, self.bounds, self.payloads = mode, bucket, bounds, payloads
        self.work, self.want_local = work, want_local
        self.gather: Work | None = None  # phase 2, once launched

    def _launched(self) -> list[Work]:
        return [self.work] + ([self.gather] if self.gather is not None else [])

    def advance(self) -> None:
        if self.gather is not None:
            return
        m, b = self.mode, self.bucket
        P, rank = m.transport.world_size, m.transport.rank
        off, n = self.bounds[rank]
        with m.timed("comm_s"):
            pieces = [p.cpu() for p in self.work.wait()]
        # Phase 1 ends here: decode and average this rank's chunk. A failure is not raised yet:
        # it rides on the next size exchange, so every rank stops instead of waiting for this one.
        failure: Exception | None = None
        failed_sender = -1
        chunk_mean = None
        with m.timed("decode_s"):
            if n:
                key = f"{b.key}/chunk{rank}"
                try:
                    acc = None
                    for r in range(P):
                        d = decode_payload(m.stream(key), pieces[r], sender=r, name=f"{key} (bucket of "
                                           f"{', '.join(b.names[:3])}{', ...' if len(b.names) > 3 else ''})",
                                           shape=(n,), dtype=b.dtype)
                        if acc is None:
                            acc = d.to(_acc_dtype(b.dtype), copy=True)
                        else:
                            acc += d
                    chunk_mean = (acc / P).to(b.dtype)
                except DecodeError as exc:
                    failure, failed_sender = exc, exc.sender
        with m.timed("encode_s"):
            payload = m.server(f"{b.key}/server").compress(chunk_mean) if chunk_mean is not None else None
            buf, (size,) = _pack([payload])
        with m.timed("comm_s"):
            rows = m.gather_sizes([size, failed_sender + 1])
        if failure is not None:
            raise failure
        for r, (_, sender) in enumerate(rows):
            if sender:
                raise ValueError(
                    f"rank {r} could not decode the payload rank {sender - 1} sent it in phase 1 of "
                    f"two_phase (rank {r}'s own error names the cause); rank {rank} stops too"
                )
        counts = [row[0] for row in rows]
        self.buf = buf  # kept alive while the gather may read it (MPI reads in the background)
        with m.timed("comm_s"):
            self.gather = m.transport.all_gather_v_async(m.to_wire(buf), counts)
        m.count(sent=counts[rank], received=sum(counts) - counts[rank],
                overhead=m.gather_padding(counts), collectives=1)

    def finish(self, out=None) -> Result:
        self.advance()
        m, b = self.mode, self.bucket
        assert self.gather is not None
        with m.timed("comm_s"):
            gathered = [p.cpu() for p in self.gather.wait()]
        with m.timed("decode_s"):
            server = m.server(f"{b.key}/server")
            chunks = [
                decode_payload(server, gathered[r], sender=r, name=f"{b.key}/server", shape=(ln,), dtype=b.dtype)
                if ln else torch.empty(0, dtype=b.dtype)
                for r, (_, ln) in enumerate(self.bounds)
            ]
            # Locals first: a payload may be a view of the input, which ``out`` may alias.
            mine = None
            if self.want_local:
                own = torch.cat([
                    m.stream(f"{b.key}/chunk{j}").decompress(p).reshape(-1).to(b.dtype) if p is not None
                    else torch.empty(0, dtype=b.dtype)
                    for j, p in enumerate(self.payloads)
                ]).to(b.device)
                mine = [own[e.offset : e.offset + e.numel].reshape(e.shape).clone() for e in b.entries]
            target = out[0] if out is not None and len(b.entries) == 1 else None
            if target is not None and target.device == chunks[0].device:
                means = [torch.cat(chunks, out=target.view(-1)).view(target.shape)]  # straight into place
            elif len(b.entries) == 1:
                means = [torch.cat(chunks).to(b.device).reshape(b.entries[0].shape)]  # a new tensor: no clone
            else:
                flat = torch.cat(chunks).to(b.device)
                means = [flat[e.offset : e.offset + e.numel].reshape(e.shape).clone() for e in b.entries]
        return means, mine


MODES: dict[str, type[Mode]] = {cls.name: cls for cls in (AllGather, AllReduce, TwoPhase)}
