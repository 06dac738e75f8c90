"""``two_phase``: a compressed reduce-scatter to chunk owners, then an all-gather of their
compressed chunk means (each owner keeps a server residue)."""

from __future__ import annotations

import torch

from ...compress.base import NonFiniteInput
from ..agreement import NonFiniteError
from ..buckets import chunk_bounds
from ..transport import Work
from .base import BucketWork, DecodeError, Mode, Result, decode_mean, decode_payload, pack


class TwoPhase(Mode):
    name = "two_phase"

    def start(self, bucket, tensors, want_local):
        P, rank = self.transport.world_size, self.transport.rank
        with self.timed("encode_s"):
            flats = [t.detach().reshape(-1) for t in tensors]
            flat = torch.cat(flats) if len(flats) > 1 else flats[0]
            bounds = chunk_bounds(bucket.numel, P)
            try:
                payloads = [
                    self.stream(f"{bucket.key}/chunk{j}").compress(flat[o : o + n]) if n else None
                    for j, (o, n) in enumerate(bounds)
                ]
                buf, send = pack(payloads)
                refused = 0
            except NonFiniteInput:  # a finite input the codec refuses (QSGD's l2 scale overflowing)
                payloads, buf, send, refused = [], flat[:0], [0] * P, 1
        with self.timed("comm_s"):
            # Each size travels with this rank's refusal flag, so every rank learns of a refusal
            # here and stops at this bucket, instead of waiting for the refusing rank's payloads.
            words = torch.tensor([[n, refused] for n in send], dtype=torch.int64, device=self.transport.device)
            got = torch.cat(self.transport.all_to_all_v(words.view(-1), [2] * P, [2] * P)).cpu().view(P, 2).tolist()
            self.count(overhead=16 * (P - 1), collectives=1)
            refusing = [r for r, (_, flag) in enumerate(got) if flag]
            if refusing:
                raise NonFiniteError(
                    f"bucket of {', '.join(bucket.names[:3])}{', ...' if len(bucket.names) > 3 else ''}: "
                    f"rank {refusing[0]}'s codec refused its input (an overflowing scale); every rank "
                    "drops this exchange call"
                )
            recv = [n for n, _ in got]
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
        rank = m.transport.rank
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
                    chunk_mean = decode_mean(
                        m.stream(key),
                        pieces,
                        name=f"{key} (bucket of {', '.join(b.names[:3])}{', ...' if len(b.names) > 3 else ''})",
                        shape=(n,),
                        dtype=b.dtype,
                    )
                except DecodeError as exc:
                    failure, failed_sender = exc, exc.sender
        with m.timed("encode_s"):
            payload = m.server(f"{b.key}/server").compress(chunk_mean) if chunk_mean is not None else None
            buf, (size,) = pack([payload])
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
        m.count(
            sent=counts[rank], received=sum(counts) - counts[rank], overhead=m.gather_padding(counts), collectives=1
        )

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
                if ln
                else torch.empty(0, dtype=b.dtype)
                for r, (_, ln) in enumerate(self.bounds)
            ]
            # Locals first: a payload may be a view of the input, which ``out`` may alias.
            mine = None
            if self.want_local:
                own = torch.cat(
                    [
                        m.stream(f"{b.key}/chunk{j}").decompress(p).reshape(-1).to(b.dtype)
                        if p is not None
                        else torch.empty(0, dtype=b.dtype)
                        for j, p in enumerate(self.payloads)
                    ]
                ).to(b.device)
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
