"""``allgather``: every rank's payloads to every rank, decoded and averaged in rank order."""

from __future__ import annotations

import torch

from ...compress.base import NonFiniteInput
from ..buckets import Bucket
from ..transport import Work
from .base import (
    STATUS_BYTES,
    BucketWork,
    Mode,
    Prepared,
    RemoteNonFinite,
    Result,
    cut,
    decode_mean,
    decode_payload,
    owned,
    pack,
)


class AllGather(Mode):
    name = "allgather"
    encodes_locally = True
    carries_status = True

    def start(self, bucket, tensors, want_local):
        return self.prepare(bucket, tensors, want_local).launch()

    def prepare(self, bucket, tensors, want_local, status=None, status_of=None):
        # Encoding needs no collective: it happens here, before the exchange's control check.
        with self.timed("encode_s"):
            streams = [self.stream(e.name) for e in bucket.entries]
            payloads = []
            for e, s, t in zip(bucket.entries, streams, tensors):
                try:
                    payloads.append(s.compress(t))
                except NonFiniteInput:
                    if status_of is None:
                        raise
                    # The codec found a NaN or inf (the exchange made no pass of its own): this
                    # rank still sends, zeros, and the status word that makes every rank drop
                    # the call (the exchange's journal undoes what these encodes advanced).
                    status = status_of(e.name)
                    payloads = [s.compress(torch.zeros_like(t)) for s, t in zip(streams, tensors)]
                    break
            buf, sizes = pack(payloads, trailer=status)
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
        self.count(
            sent=counts[rank] - extra,
            received=sum(counts) - counts[rank] - (P - 1) * extra,
            overhead=self.gather_padding(counts) + P * extra,
            collectives=1,
        )
        return _AllGatherWork(self, bucket, rows, buf, work, want_local, trailed)


class _AllGatherWork(BucketWork):
    def __init__(
        self,
        mode: AllGather,
        bucket: Bucket,
        rows: list[list[int]],
        buf: torch.Tensor,
        work: Work,
        want_local: bool,
        trailed: bool = False,
    ):
        self.mode, self.bucket, self.rows, self.work, self.want_local = mode, bucket, rows, work, want_local
        self.trailed = trailed
        self.buf = buf  # this rank's own packed payloads, the bytes it sent

    def _launched(self) -> list[Work]:
        return [self.work]

    def _decode_row(self, sender: int, buf: torch.Tensor) -> list[torch.Tensor]:
        m, b = self.mode, self.bucket
        return [
            decode_payload(m.stream(e.name), part, sender=sender, name=e.name, shape=e.shape, dtype=b.dtype)
            for e, part in zip(b.entries, cut(buf, self.rows[sender]))
        ]

    def _received(self) -> list[torch.Tensor]:
        with self.mode.timed("comm_s"):
            pieces = [p.cpu() for p in self.work.wait()]
        if self.trailed:  # every rank reads the same words and takes the same decision
            statuses = [int(p[p.numel() - STATUS_BYTES :].clone().view(torch.int64)[0]) for p in pieces]
            if any(statuses):
                raise RemoteNonFinite(statuses)
        return pieces

    def finish(self, out=None) -> Result:
        m, b = self.mode, self.bucket
        mine = None
        if self.want_local:
            # What this rank contributed, decoded from the bytes it sent while the gather travels.
            with m.timed("decode_s"):
                mine = [owned(d, [self.buf]).to(b.device) for d in self._decode_row(m.transport.rank, self.buf)]
        pieces = self._received()
        with m.timed("decode_s"):
            # Every rank decodes the received bytes of every rank (its own included), one tensor at
            # a time, in rank order and in one pass where the codec fuses decoding and summing
            # (QSGD): the same operations on every rank give the same bits, and a payload damaged
            # on the way makes every rank raise alike.
            # A mean formed where the caller wants it (``out``: the gradient) needs no copy.
            rows = [cut(p, self.rows[r]) for r, p in enumerate(pieces)]
            targets = out if out is not None else [None] * len(b.entries)
            means = [
                decode_mean(
                    m.stream(e.name),
                    [row[i] for row in rows],
                    name=e.name,
                    shape=e.shape,
                    dtype=b.dtype,
                    out=t if t is not None and t.device == pieces[0].device else None,
                ).to(b.device)
                for i, (e, t) in enumerate(zip(b.entries, targets))
            ]
        return means, mine
