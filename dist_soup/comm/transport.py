"""How bytes and tensors move between ranks: one small interface, several back ends.

A :class:`Transport` is the only place in dist_soup that calls a communication library. The
compressed collectives (:mod:`dist_soup.comm.modes`) need five primitives, each with an
asynchronous form returning a :class:`Work` whose ``wait()`` gives the result:

==========================  ==============================================================
``all_reduce_(t, op)``      in place, ``op`` in ``"sum"``, ``"max"``, ``"min"``
``broadcast_(t, src)``      in place, from group rank ``src``
``all_gather_v(t, counts)`` every rank's 1-D ``t`` (rank r holds ``counts[r]`` values)
``all_to_all_v(t, s, r)``   1-D ``t`` cut in ``s[j]``-long pieces, piece j to rank j;
                            returns the P pieces received (``r[j]`` values from rank j)
``barrier()``
==========================  ==============================================================

(and the blocking forms ``all_reduce_``, ``broadcast_``, ``all_gather_v``, ``all_to_all_v``).

Back ends: :class:`LocalTransport` (one process, every collective is the identity),
:class:`TorchTransport` (torch.distributed: gloo, NCCL, anything that implements the
collectives) and ``dist_soup.comm.mpi.MPITransport`` (mpi4py buffer methods). Ranks are always
ranks *within* the transport's group.

Buffers live on ``transport.device``: a transport moves a tensor that lives elsewhere there
and back (NCCL needs CUDA tensors; gloo and MPI take CPU ones). ``reduce_dtype(dtype)`` is the
dtype the back end actually reduces in (gloo has no int16 reduction, so int16 travels as int32);
callers that count bytes convert first so that what they count is what travels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

OPS = ("sum", "max", "min")


def copy_back(buf: torch.Tensor, t: torch.Tensor):
    """The finishing step of an in-place collective run on ``buf``, a staged copy of ``t`` (or
    ``t`` itself): put the result back into ``t`` and return it."""

    def finish() -> torch.Tensor:
        if buf is not t:
            t.copy_(buf)
        return t

    return finish


class Work:
    """Handle of an operation in flight; ``wait()`` blocks and returns its result (once computed,
    the result is cached, so ``wait()`` may be called again)."""

    def __init__(
        self, waits: Sequence[Callable[[], Any]] = (), finish: Callable[[], Any] | None = None, result: Any = None
    ) -> None:
        self._waits = list(waits)
        self._finish = finish
        self._result = result
        self._done = False

    def wait(self) -> Any:
        if not self._done:
            for w in self._waits:
                w()
            if self._finish is not None:
                self._result = self._finish()
            self._done = True
            self._waits = []
            self._finish = None
        return self._result


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"reduction op {op!r} is not supported; allowed: {', '.join(OPS)}")


def split_counts(flat: torch.Tensor, counts: Sequence[int], stride: int | None = None) -> list[torch.Tensor]:
    """Views of ``flat`` cut into consecutive pieces of ``counts`` values (each piece starting at
    a multiple of ``stride`` when given, for padded layouts)."""
    out, off = [], 0
    for i, c in enumerate(counts):
        start = i * stride if stride is not None else off
        out.append(flat[start : start + c])
        off += c
    return out


class Transport(ABC):
    """The collectives of one group of ``world_size`` processes; this process is ``rank``."""

    rank: int
    world_size: int
    device: torch.device
    #: True when ``all_gather_v`` pads every piece to the longest (the padding also travels).
    pads_gather: bool = False

    def reduce_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # --- the primitives -------------------------------------------------------------------
    @abstractmethod
    def all_reduce_async_(self, t: torch.Tensor, op: str = "sum") -> Work:
        """Start an in-place reduction of ``t`` over the group; ``wait()`` returns ``t``."""

    @abstractmethod
    def broadcast_async_(self, t: torch.Tensor, src: int) -> Work:
        """Start overwriting ``t`` with rank ``src``'s ``t``; ``wait()`` returns ``t``."""

    @abstractmethod
    def all_gather_v_async(self, t: torch.Tensor, counts: Sequence[int]) -> Work:
        """Start gathering 1-D ``t`` (``counts[rank]`` values) from every rank; ``wait()``
        returns the list of P tensors, rank r's holding ``counts[r]`` values."""

    @abstractmethod
    def all_to_all_v_async(self, t: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]) -> Work:
        """Start an all-to-all of 1-D ``t``; ``wait()`` returns the P received pieces."""

    @abstractmethod
    def barrier(self) -> None:
        """Block until every rank of the group reaches this point."""

    # --- synchronous forms and conveniences -----------------------------------------------
    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.all_reduce_async_(t, op).wait()

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return self.broadcast_async_(t, src).wait()

    def all_gather_v(self, t: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
        return self.all_gather_v_async(t, counts).wait()

    def all_to_all_v(
        self, t: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]
    ) -> list[torch.Tensor]:
        return self.all_to_all_v_async(t, send_counts, recv_counts).wait()

    def _check_counts(self, t: torch.Tensor, counts: Sequence[int], what: str) -> None:
        if t.dim() != 1:
            raise ValueError(f"{what} takes a 1-D tensor, got shape {tuple(t.shape)}")
        if len(counts) != self.world_size:
            raise ValueError(f"{what} needs {self.world_size} counts, got {len(counts)}")


class LocalTransport(Transport):
    """A group of one: every collective returns this process's own data."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device)

    def all_reduce_async_(self, t, op="sum"):
        _check_op(op)
        return Work(result=t)

    def broadcast_async_(self, t, src):
        if src != 0:
            raise ValueError(f"broadcast source {src} is not a rank of a group of 1")
        return Work(result=t)

    def all_gather_v_async(self, t, counts):
        self._check_counts(t, counts, "all_gather_v")
        return Work(result=[t[: counts[0]]])

    def all_to_all_v_async(self, t, send_counts, recv_counts):
        self._check_counts(t, send_counts, "all_to_all_v")
        return Work(result=[t[: send_counts[0]]])

    def barrier(self) -> None:
        return None

    def __repr__(self) -> str:
        return "LocalTransport()"


class TorchTransport(Transport):
    """torch.distributed collectives on ``group`` (the default group when None).

    Buffers go to ``cuda:current_device`` when the backend is NCCL, else stay on the CPU.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "transport='torch' needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first), or use transport=None/'local'"
            )
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        if "nccl" in self.backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.pads_gather = True
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

    def reduce_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # gloo reduces int8/uint8/int32/int64 and floats, not int16.
        if dtype == torch.int16 and "gloo" in self.backend:
            return torch.int32
        return dtype

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return self._dist.get_global_rank(self.group, group_rank)

    def _staged(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` as a contiguous buffer on this transport's device (itself when it already is)."""
        dtype = dtype or t.dtype
        if t.device == self.device and t.dtype == dtype and t.is_contiguous():
            return t
        return t.to(self.device, dtype).contiguous()

    def all_reduce_async_(self, t, op="sum"):
        _check_op(op)
        buf = self._staged(t, self.reduce_dtype(t.dtype))
        work = self._dist.all_reduce(buf, op=self._ops[op], group=self.group, async_op=True)

        return Work([work.wait], copy_back(buf, t))

    def broadcast_async_(self, t, src):
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast source {src} is not a rank of a group of {self.world_size}")
        buf = self._staged(t)
        work = self._dist.broadcast(buf, src=self._global(src), group=self.group, async_op=True)

        return Work([work.wait], copy_back(buf, t))

    def all_gather_v_async(self, t, counts):
        self._check_counts(t, counts, "all_gather_v")
        # torch's all_gather wants equal sizes: pad every piece to the longest.
        width = max(counts)
        if t.numel() == width:  # nothing to pad (fixed-size payloads): send t itself
            src = self._staged(t)
        else:
            src = torch.zeros(width, dtype=t.dtype, device=self.device)
            src[: t.numel()].copy_(t)
        out = torch.empty(width * self.world_size, dtype=t.dtype, device=self.device)
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        work = gather(out, src, group=self.group, async_op=True)
        return Work([work.wait], lambda: split_counts(out, counts, stride=width))

    def all_to_all_v_async(self, t, send_counts, recv_counts):
        self._check_counts(t, send_counts, "all_to_all_v")
        self._check_counts(t, recv_counts, "all_to_all_v")
        src = self._staged(t)
        out = torch.empty(sum(recv_counts), dtype=t.dtype, device=self.device)
        work = self._dist.all_to_all_single(
            out,
            src,
            output_split_sizes=list(recv_counts),
            input_split_sizes=list(send_counts),
            group=self.group,
            async_op=True,
        )
        return Work([work.wait], lambda: split_counts(out, recv_counts))

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"TorchTransport(backend={self.backend!r}, rank={self.rank}, world_size={self.world_size})"


def make_transport(transport: Transport | str | None, group: Any = None) -> Transport:
    """``None``: torch.distributed if initialised, else a group of one; or "torch", "mpi",
    "local", or a :class:`Transport` instance."""
    if isinstance(transport, Transport):
        if group is not None:
            raise ValueError("pass either group= or a Transport instance (which has its group), not both")
        return transport
    if transport is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return TorchTransport(group)
        if group is not None:
            raise ValueError("group= was given but torch.distributed is not initialised")
        return LocalTransport()
    if transport == "torch":
        return TorchTransport(group)
    if transport == "mpi":
        from .mpi import MPITransport

        return MPITransport(group)
    if transport == "local":
        return LocalTransport()
    raise ValueError(f"transport must be None, 'torch', 'mpi', 'local' or a Transport instance, got {transport!r}")
