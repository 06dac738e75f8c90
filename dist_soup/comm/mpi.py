"""The mpi4py transport: the same primitives over MPI, on CPU buffers, without pickle.

Only mpi4py's buffer methods are used (``Iallreduce``, ``Ibcast``, ``Iallgatherv``,
``Ialltoallv``, ``Barrier``): tensors are handed to MPI as numpy views of their memory, so no
object is ever serialised. MPI has no standard half-precision types, so float16 and bfloat16
travel as 16-bit integers and are reduced by user-defined operations that reinterpret the bits
(summing in the value's own precision, like gloo and NCCL do).

Run under ``mpirun -n P python script.py``; ``pip install mpi4py mpich`` gives a working
``mpirun`` with no system packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .transport import Transport, Work, _check_op, copy_back, split_counts

_HALF = (torch.float16, torch.bfloat16)
_half_ops: dict[tuple[torch.dtype, str], Any] = {}


def _half_op(MPI: Any, dtype: torch.dtype, op: str) -> Any:
    """A commutative MPI op that reduces 16-bit buffers as ``dtype`` values."""
    key = (dtype, op)
    if key not in _half_ops:

        def reduce(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
            x = torch.frombuffer(inbuf, dtype=dtype)
            y = torch.frombuffer(inoutbuf, dtype=dtype)
            if op == "sum":
                y.add_(x)
            elif op == "max":
                torch.maximum(y, x, out=y)
            else:
                torch.minimum(y, x, out=y)

        _half_ops[key] = MPI.Op.Create(reduce, commute=True)
    return _half_ops[key]


class MPITransport(Transport):
    """Collectives on an mpi4py communicator (``MPI.COMM_WORLD`` when ``comm`` is None)."""

    def __init__(self, comm: Any = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:  # keep the reason: a missing libmpi looks the same
            raise ValueError(
                f"transport='mpi' needs mpi4py and an MPI library ({exc}); install them with `pip install mpi4py mpich`"
            ) from None
        self._MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.device = torch.device("cpu")
        self._types = {
            torch.float32: MPI.FLOAT,
            torch.float64: MPI.DOUBLE,
            torch.int8: MPI.INT8_T,
            torch.uint8: MPI.UINT8_T,
            torch.int16: MPI.INT16_T,
            torch.int32: MPI.INT32_T,
            torch.int64: MPI.INT64_T,
            torch.float16: MPI.INT16_T,
            torch.bfloat16: MPI.INT16_T,
        }
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    # --- buffers ----------------------------------------------------------------------------
    def _mpi_type(self, dtype: torch.dtype) -> Any:
        try:
            return self._types[dtype]
        except KeyError:
            raise ValueError(
                f"MPITransport cannot move {dtype}; supported: {', '.join(map(str, self._types))}"
            ) from None

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and t.is_contiguous():
            return t
        return t.detach().to("cpu").contiguous()

    @staticmethod
    def _array(t: torch.Tensor) -> Any:
        if t.dtype in _HALF:
            return t.view(torch.int16).numpy()
        return t.numpy()

    def _spec(self, t: torch.Tensor) -> list[Any]:
        return [self._array(t), self._mpi_type(t.dtype)]

    # --- primitives ---------------------------------------------------------------------------
    def all_reduce_async_(self, t, op="sum"):
        _check_op(op)
        buf = self._staged(t.detach())
        mpi_op = _half_op(self._MPI, t.dtype, op) if t.dtype in _HALF else self._ops[op]
        req = self.comm.Iallreduce(self._MPI.IN_PLACE, self._spec(buf), op=mpi_op)

        return Work([req.Wait], copy_back(buf, t))

    def broadcast_async_(self, t, src):
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast source {src} is not a rank of a group of {self.world_size}")
        buf = self._staged(t.detach())
        req = self.comm.Ibcast(self._spec(buf), root=src)

        return Work([req.Wait], copy_back(buf, t))

    @staticmethod
    def _displs(counts: Sequence[int]) -> list[int]:
        out, off = [], 0
        for c in counts:
            out.append(off)
            off += c
        return out

    def all_gather_v_async(self, t, counts):
        self._check_counts(t, counts, "all_gather_v")
        counts = [int(c) for c in counts]
        if t.numel() != counts[self.rank]:
            raise ValueError(f"all_gather_v: this rank holds {t.numel()} values, counts say {counts[self.rank]}")
        src = self._staged(t)
        out = torch.empty(sum(counts), dtype=t.dtype)
        typ = self._mpi_type(t.dtype)
        req = self.comm.Iallgatherv([self._array(src), typ], [self._array(out), (counts, self._displs(counts)), typ])
        return Work([req.Wait], lambda: split_counts(out, counts))

    def all_to_all_v_async(self, t, send_counts, recv_counts):
        self._check_counts(t, send_counts, "all_to_all_v")
        self._check_counts(t, recv_counts, "all_to_all_v")
        send_counts = [int(c) for c in send_counts]
        recv_counts = [int(c) for c in recv_counts]
        src = self._staged(t)
        out = torch.empty(sum(recv_counts), dtype=t.dtype)
        typ = self._mpi_type(t.dtype)
        req = self.comm.Ialltoallv(
            [self._array(src), (send_counts, self._displs(send_counts)), typ],
            [self._array(out), (recv_counts, self._displs(recv_counts)), typ],
        )
        return Work([req.Wait], lambda: split_counts(out, recv_counts))

    def barrier(self) -> None:
        self.comm.Barrier()

    def __repr__(self) -> str:
        return f"MPITransport(rank={self.rank}, world_size={self.world_size})"
