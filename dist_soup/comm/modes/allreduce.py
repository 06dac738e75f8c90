"""``allreduce``: linear codecs encode against agreed values and their wire tensors are summed."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from ...compress.base import LinearCodec, NonFiniteInput
from ..agreement import NonFiniteError
from ..buckets import Bucket
from ..transport import Work
from .base import BucketWork, Mode, Prepared, Result, outside_level


class AllReduce(Mode):
    name = "allreduce"
    _warned = False

    def start(self, bucket, tensors, want_local):
        return self.prepare(bucket, tensors, want_local).launch()

    def prepare(self, bucket, tensors, want_local):
        P, rank = self.transport.world_size, self.transport.rank
        streams: list[LinearCodec] = [self.stream(e.name) for e in bucket.entries]  # the exchange checked: linear
        with self.timed("encode_s"):
            asks = [self._ask(s, t, rank, P) for s, t in zip(streams, tensors)]
        collect, launched = self._agree_async(streams, asks, bucket.names)
        return Prepared(lambda: self._launch(bucket, tensors, want_local, streams, collect()), launched)

    @staticmethod
    def _ask(stream: LinearCodec, t: torch.Tensor, rank: int, P: int) -> tuple[torch.Tensor, str] | None:
        """The codec's agreement tensor; inf where the codec refuses a finite input (QSGD's l2
        scale overflowing), so that the agreed (max or sum) values are not finite on every rank
        and every rank stops at this bucket (:meth:`_agree_async`), none waits for the others."""
        try:
            return stream.agreement(t, rank, P)
        except NonFiniteInput:
            ask = stream.agreement(torch.zeros_like(t), rank, P)
            assert ask is not None and ask[1] in ("max", "sum")  # a refusing codec agrees by max or sum
            return ask[0].fill_(float("inf")), ask[1]

    def _launch(self, bucket, tensors, want_local, streams, agreed):
        P = self.transport.world_size
        with self.timed("encode_s"):
            wires = [s.encode_sum(t, a, P) for s, t, a in zip(streams, tensors, agreed)]
            # Own decode first: the SUM below may run in place on a wire.
            mine = (
                [
                    s.decode_local(w, a, P).reshape(e.shape).to(bucket.dtype).to(bucket.device)
                    for s, w, a, e in zip(streams, wires, agreed, bucket.entries)
                ]
                if want_local
                else None
            )
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
                    RuntimeWarning,
                    stacklevel=outside_level(),
                )
                return

    def _agree_async(
        self, streams: Sequence[LinearCodec], asks: Sequence[tuple[torch.Tensor, str] | None], names: Sequence[str]
    ) -> tuple[Callable[[], list[torch.Tensor | None]], list[Work]]:
        """Launch the reductions or broadcasts of the codecs' agreement tensors, fused per
        (op, dtype, leader); returns (a function that waits and gives the agreed tensors, the
        operations launched). Agreed float values that are not finite (some rank's codec refused
        its input, :meth:`_ask`) raise :class:`NonFiniteError` there: the same values, hence the
        same decision, on every rank."""
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
                    if flat.is_floating_point() and not bool(flat.isfinite().all()):  # once per fused group
                        bad = next(names[i] for i in idx if not bool(agreed[i].isfinite().all()))  # type: ignore[union-attr]
                        raise NonFiniteError(
                            f"tensor {bad!r}: some rank's codec refused its input (an overflowing scale); "
                            "every rank drops this exchange call before encoding it"
                        )
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
