"""A DDP communication hook that averages gradient buckets through a compressed ``Exchange``.

For users of ``torch.nn.parallel.DistributedDataParallel`` with a single objective::

    model = DistributedDataParallel(net)
    state = dist_soup.integrations.ddp.register(model, "qsgd", mode="allgather", bits=4)
    ...                                   # train as usual
    state.exchange.stats.bytes_sent       # what this rank put on the wire

DDP hands the hook one flat ``GradBucket`` buffer ``g^p`` per bucket on every rank p and expects
a future whose value replaces it. The hook returns the compressed mean::

    mean = (1 / P) * sum_p decode(encode(g^p))         (identical on every rank)

computed by ``state.exchange.mean(name, g^p)``. The stream ``name`` is keyed by the bucket's
index and size, so each bucket keeps its own error-feedback residue across steps (DDP rebuilds
its buckets once after the first step; the new buckets start new streams). With ``identity`` the
result equals plain DDP's ``allreduce`` average up to float rounding of the summation order.

Like torch's ``ddp_comm_hooks``, the hook is a plain function over a small state object, so it
can also be registered by hand: ``model.register_comm_hook(state, compressed_mean_hook)``.

Chunks: the exchange cuts a DDP bucket (25 MB by default) of more than ``chunk_mb`` into pieces
``f"{name}#{j}"`` that travel as separate streams, each its own collective (``Exchange``'s
``chunk_mb``); it encodes piece j+1 while piece j is on the wire and decodes piece j while j+1
is, and it forms the mean in the bucket's own memory (``out=``) (``benchmarks/collectives.py``
measures the pieces against one stream).

Overlap: with ``async_op=True`` the hook hands the bucket to one communication thread and returns
at once, so backward keeps computing while earlier buckets are encoded, exchanged and decoded.
One thread, first-in first-out, keeps the order of the collectives the same on every rank
(DDP launches buckets in the same order everywhere). The thread runs the whole synchronous
call: ``Exchange.mean_many_async`` has no completion callback to chain a future on, and
its ``wait()`` may itself issue collectives (``two_phase``), which must keep that order too.
DDP itself issues collectives during
backward when ``find_unused_parameters`` or ``static_graph`` is on; those could interleave with
the thread's in a different order on different ranks, so such models use the synchronous path.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations at registration
# and compares them with the real ``dist.GradBucket`` and ``Future[Tensor]`` objects.
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..comm import Exchange

__all__ = ["DDPCommState", "compressed_mean_hook", "register"]


@dataclass
class DDPCommState:
    """What the hook needs between calls: the exchange, naming and the communication thread.

    ``exchange``: the compressed collective (its ``stats`` count bytes and seconds).
    ``prefix``: stream names are ``f"{prefix}{bucket_index}/{numel}"`` (the exchange adds
    ``#{j}`` per piece of a bucket larger than its ``chunk_mb``).
    ``async_op``: run the exchange on the communication thread (overlapping backward).
    ``calls``: buckets averaged so far (a counter for logs and tests).
    """

    exchange: Exchange
    prefix: str = "ddp/bucket"
    async_op: bool = False
    calls: int = 0
    _executor: "ThreadPoolExecutor | None" = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def stream_name(self, bucket_index: int, numel: int) -> str:
        return f"{self.prefix}{bucket_index}/{numel}"

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                # One worker: collectives leave in the order the buckets arrive, on every rank.
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist_soup_ddp")
            return self._executor

    def close(self) -> None:
        """Stops the communication thread (after the buckets already handed to it)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


def _future_for(buffer: torch.Tensor) -> "torch.futures.Future[torch.Tensor]":
    # A CUDA value needs a CUDA-aware future so DDP's stream waits on the result.
    if buffer.is_cuda:
        return torch.futures.Future(devices=[buffer.device])
    return torch.futures.Future()


def _average_into(state: DDPCommState, name: str, buffer: torch.Tensor) -> torch.Tensor:
    # In place, like torch's fp16 hook: DDP copies the value into the gradients, and reusing
    # the bucket's memory keeps the peak memory of a step unchanged; the exchange assembles
    # the bucket's pieces straight into it (every piece was encoded before any is written).
    state.exchange.mean_many({name: buffer}, out={name: buffer})
    state.calls += 1
    return buffer


def compressed_mean_hook(state: DDPCommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook: the compressed mean of ``bucket.buffer()`` over the ranks."""
    buffer = bucket.buffer()
    name = state.stream_name(bucket.index(), buffer.numel())
    fut = _future_for(buffer)
    if not state.async_op:
        fut.set_result(_average_into(state, name, buffer))
        return fut

    ready = None
    if buffer.is_cuda:
        # The gradients were written on the autograd stream; the thread must not read earlier.
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(buffer.device))

    def work() -> None:
        try:
            if ready is not None:
                torch.cuda.set_device(buffer.device)
                torch.cuda.current_stream(buffer.device).wait_event(ready)
            fut.set_result(_average_into(state, name, buffer))
        except BaseException as exc:  # DDP's wait() re-raises it on the training thread
            # torch's type annotations give set_exception the result type (Tensor), not an exception
            fut.set_exception(exc)  # type: ignore[arg-type]

    state.executor().submit(work)
    return fut


def register(
    ddp_model: DistributedDataParallel,
    compressor: str = "qsgd",
    mode: str = "allgather",
    *,
    group: dist.ProcessGroup | None = None,
    async_op: bool = True,
    chunk_mb: "float | None" = 4.0,
    prefix: str = "ddp/bucket",
    **options: Any,
) -> DDPCommState:
    """Installs :func:`compressed_mean_hook` on ``ddp_model``; returns its state.

    ``compressor`` and ``options`` (codec options such as ``bits=4``, and ``Exchange`` options such
    as ``transport=`` or ``bucket_mb=``) build the :class:`~dist_soup.comm.Exchange`; ``mode`` is
    ``"allgather"``, ``"allreduce"`` or ``"two_phase"``. ``group`` defaults to the model's own
    process group. ``async_op=True`` overlaps communication with backward (see the module
    docstring; models with ``find_unused_parameters`` or ``static_graph`` run synchronously).
    ``chunk_mb`` (the exchange's option) cuts each bucket into pieces of at most about that many
    megabytes, each its own stream and collective (None: one stream per bucket).
    A DDP model takes one hook, once, before its first backward.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"register needs a torch.nn.parallel.DistributedDataParallel model, got {type(ddp_model).__name__}"
        )
    if not isinstance(compressor, str):
        raise TypeError(f"compressor must be a codec name (str), got {type(compressor).__name__}")
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    if chunk_mb is not None and (
        isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or not 0 < chunk_mb < float("inf")
    ):
        raise ValueError(f"chunk_mb must be None or a positive number of megabytes, got {chunk_mb!r}")
    if group is None:
        group = ddp_model.process_group
    exchange = Exchange(compressor, mode, group=group, chunk_mb=chunk_mb, **options)
    ddp_collectives = bool(getattr(ddp_model, "find_unused_parameters", False)) or bool(
        getattr(ddp_model, "static_graph", False)
    )
    state = DDPCommState(exchange, prefix=prefix, async_op=bool(async_op) and not ddp_collectives)
    ddp_model.register_comm_hook(state, compressed_mean_hook)
    return state
