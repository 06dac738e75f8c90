"""``Exchange``: named, compressed, bucketed all-reduces (the mean over ranks) with accounting.

One exchange owns one codec configuration and many *streams*, one per tensor name (and, in
``two_phase``, one per chunk of a bucket plus this rank's server stream), each built with
``dist_soup.compress.build(compressor, seed=seed, rank=rank, stream=stream_id(key), **options)``
where ``stream_id`` is a stable hash of the stream's name, so reruns and resumed runs draw the
same random numbers. A stream keeps its residue across calls with the same name.

Every call starts with one small control collective (see :mod:`dist_soup.comm.agreement`) that
checks, on every call, that all ranks run the same configuration on the same tensors, and carries
the input-validation and finiteness status of every rank: an error on one rank becomes an error
on all of them, before anything is encoded. Then the tensors are cut into buckets
(:mod:`dist_soup.comm.buckets`) and each bucket goes through the mode's collectives
(:mod:`dist_soup.comm.modes`); the asynchronous form returns after launching them.

A single process (no initialised torch.distributed, or ``transport="local"``) is a group of one:
every collective is the identity, but tensors are still encoded and decoded, so the compression
error is the same as with P ranks.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping

import torch

from ..compress.base import Compressor, LinearCodec
from ..compress.registry import build
from .agreement import NonFiniteError, Setting, TensorSpec, agree, exchange_settings, stream_id, tensor_settings
from .buckets import Bucket, plan
from .modes import MODES, BucketWork
from .stats import ExchangeStats
from .transport import LocalTransport, Transport, TorchTransport

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_FORMAT = 1
_RESERVED = ("rank", "stream")


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
    raise ValueError(
        f"transport must be None, 'torch', 'mpi', 'local' or a Transport instance, got {transport!r}"
    )


class Exchange:
    """Compressed mean over the ranks of a group, keyed by tensor name.

    ``Exchange(compressor, mode="allgather", *, group=None, transport=None, bucket_mb=25.0,
    **codec_options)``: ``compressor`` is a codec name of :mod:`dist_soup.compress`, ``mode`` one of
    ``"allgather"``, ``"allreduce"`` (linear codecs only) and ``"two_phase"``; ``codec_options``
    (``seed`` included) go to every stream the exchange builds.
    """

    def __init__(self, compressor: str, mode: str = "allgather", *, group: Any = None,
                 transport: Transport | str | None = None, bucket_mb: float = 25.0, **codec_options: Any) -> None:
        if not isinstance(compressor, str):
            raise TypeError(f"compressor must be a codec name (str), got {type(compressor).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not (
                math.isfinite(bucket_mb) and bucket_mb > 0):
            raise ValueError(f"bucket_mb must be a positive finite number of megabytes, got {bucket_mb!r}")
        bad = [k for k in _RESERVED if k in codec_options]
        if bad:
            raise ValueError(f"codec options {bad} are set by the exchange (each rank and stream gets its own)")
        seed = codec_options.pop("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")

        self.transport = make_transport(transport, group)
        self.compressor = compressor
        self.mode = mode
        self.seed = seed
        self.bucket_mb = float(bucket_mb)
        self.options = dict(codec_options)
        self.stats = ExchangeStats()

        probe = self._build(0)  # unknown codecs and options fail here, on every rank alike
        if mode == "allreduce" and not isinstance(probe, LinearCodec):
            raise ValueError(
                f"compressor {compressor!r} cannot be summed on the wire, so mode='allreduce' is not "
                "available for it; it supports modes 'allgather' and 'two_phase'"
            )
        self._streams: dict[str, Compressor] = {}
        self._servers: dict[str, Compressor] = {}
        self._known: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._plans: dict[tuple, list[Bucket]] = {}
        # Names of an asynchronous call not yet waited for: a stream runs one call at a time
        # (linear codecs keep what decode_sum needs between encode_sum and decode_sum).
        self._inflight: set[str] = set()
        self._settings = exchange_settings(compressor, self.options, seed, mode,
                                           self.transport.world_size, self.bucket_mb)
        self._n_settings = len(self._settings) + len(tensor_settings([]))
        self._mode = MODES[mode](self.transport, self.stats, self._stream, self._server)

    # --- streams ------------------------------------------------------------------------------
    def _build(self, sid: int) -> Compressor:
        return build(self.compressor, seed=self.seed, rank=self.transport.rank, stream=sid, **self.options)

    def _stream(self, key: str) -> Compressor:
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = self._build(stream_id(key))
        return s

    def _server(self, key: str) -> Compressor:
        s = self._servers.get(key)
        if s is None:
            s = self._servers[key] = self._build(stream_id("server:" + key))
        return s

    # --- the calls ------------------------------------------------------------------------------
    def all_reduce(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over the ranks of ``tensor`` (compressed by the stream ``name``), identical on
        every rank, with ``tensor``'s shape and dtype."""
        return self.all_reduce_many({name: tensor})[name]

    def all_reduce_many(self, tensors: Mapping[str, torch.Tensor], *, return_local: bool = False) -> Any:
        """Means of many named tensors, fused into buckets of about ``bucket_mb``.

        Returns ``{name: mean}``, or ``(means, locals)`` with ``return_local``, where
        ``locals[name]`` is this rank's own decoded contribution.
        """
        return self.all_reduce_many_async(tensors, return_local=return_local).wait()

    def all_reduce_many_async(self, tensors: Mapping[str, torch.Tensor], *, return_local: bool = False) -> "ExchangeHandle":
        """Like :meth:`all_reduce_many`, returning once the collectives are launched;
        ``handle.wait()`` returns the same result."""
        specs: list[TensorSpec] = []
        settings: list[Setting] | None = None
        error: Exception | None = None
        nonfinite: int | None = None
        try:
            specs = self._inspect(tensors)
            settings = self._settings + tensor_settings(specs)
            nonfinite = _first_nonfinite([tensors[s[0]] for s in specs])
        except (TypeError, ValueError) as exc:
            error = exc
        ctl0 = time.perf_counter()
        if self.transport.world_size > 1:
            nbytes, ncoll = agree(self.transport, settings, specs, n_settings=self._n_settings,
                                  local_error=error, nonfinite=nonfinite)
            self.stats.overhead_bytes += nbytes
            self.stats.collectives += ncoll
        else:
            agree_locally(error, nonfinite, specs)
        self.stats.comm_s += time.perf_counter() - ctl0
        self.stats.calls += 1

        for name, shape, dtype in specs:
            self._known.setdefault(name, (shape, dtype))
            self.stats.dense_bytes += 4 * math.prod(shape)
        # A group of one with the lossless codec: the mean (and the local decode) is the input,
        # so the handle's copy replaces the encode/pack/decode copies.
        passthrough = self.transport.world_size == 1 and self.compressor == "identity"
        layout = tuple((n, s, d, tensors[n].device) for n, s, d in specs if math.prod(s) > 0 and not passthrough)
        buckets = self._plans.get(layout)
        if buckets is None:
            if len(self._plans) >= 256:  # callers with ever-new layouts: keep the cache bounded
                self._plans.clear()
            buckets = self._plans[layout] = plan(layout, int(self.bucket_mb * 2**20))
        names = {n for n, _, _ in specs}
        self._inflight |= names
        try:
            works: list[BucketWork] = []
            for b in buckets:
                works.append(self._mode.start(b, [tensors[e.name].detach() for e in b.entries], return_local))
        except BaseException:
            for work in works:
                work.abandon()
            self._inflight -= names
            raise
        return ExchangeHandle(self, tensors, specs, buckets, works, return_local, passthrough)

    def _inspect(self, tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping name -> tensor, got {type(tensors).__name__}")
        specs = []
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"tensor {name!r} has dtype {t.dtype}; allowed: {', '.join(map(str, FLOAT_DTYPES))}"
                )
            if name in self._inflight:
                raise ValueError(
                    f"tensor {name!r} is still in flight in an earlier all_reduce_many_async call; "
                    "wait() for that handle before using the stream again"
                )
            known = self._known.get(name)
            shape = tuple(t.shape)
            if known is not None and known != (shape, t.dtype):
                raise ValueError(
                    f"tensor {name!r} has shape {shape} and dtype {t.dtype}, but its stream was built for "
                    f"shape {known[0]} and dtype {known[1]}; a stream keeps one shape (use another name)"
                )
            specs.append((name, shape, t.dtype))
        return specs

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every stream's state on this rank (residues, step counters) and the two_phase server
        streams': nested dicts of str keys, tensors and ints (``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            "rank": self.transport.rank,
            "world_size": self.transport.world_size,
            "streams": {k: s.state_dict() for k, s in self._streams.items()},
            "server": {k: s.state_dict() for k, s in self._servers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an Exchange state_dict of format {STATE_FORMAT}")
        for key in ("streams", "server"):
            if not isinstance(state.get(key), Mapping):
                raise ValueError(f"Exchange state_dict lacks its {key!r} mapping")
        if self.mode == "two_phase" and state["world_size"] != self.transport.world_size:
            raise ValueError(
                f"two_phase state was saved with {state['world_size']} ranks, this group has "
                f"{self.transport.world_size}: chunks (and their residues) would not line up"
            )
        for k, s in state["streams"].items():
            self._stream(k).load_state_dict(s)
        for k, s in state["server"].items():
            self._server(k).load_state_dict(s)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (f"Exchange({self.compressor!r}, mode={self.mode!r}, bucket_mb={self.bucket_mb}, "
                f"seed={self.seed}{opts}, transport={self.transport!r})")


def agree_locally(error: Exception | None, nonfinite: int | None, specs: list[TensorSpec]) -> None:
    """The control step of a group of one: only local checks."""
    if error is not None:
        raise error
    if nonfinite is not None:
        raise NonFiniteError(
            f"tensor {specs[nonfinite][0]!r} holds non-finite values (inf or NaN) on rank 0; "
            "nothing was encoded and no residue changed"
        )


def _first_nonfinite(tensors: list[torch.Tensor]) -> int | None:
    """Index of the first tensor holding inf or NaN, else None.

    One cheap pass: a sum is finite iff every term is, unless it overflows, so the exact
    element-wise test only runs on tensors whose sum is not finite.
    """
    if not tensors:
        return None
    sums = [
        t.detach().sum(dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype).to(torch.float64)
        for t in tensors
    ]
    devices = {s.device for s in sums}
    if len(devices) == 1:  # one device-to-host transfer, not one per tensor
        flags = (~torch.isfinite(torch.stack(sums))).cpu()
    else:
        flags = torch.stack([~torch.isfinite(s).cpu() for s in sums])
    bad = flags.nonzero().flatten().tolist()
    for i in bad:
        if not bool(torch.isfinite(tensors[i]).all()):
            return i
    return None


class ExchangeHandle:
    """An exchange in flight; ``wait()`` returns what :meth:`Exchange.all_reduce_many` returns."""

    def __init__(self, exchange: Exchange, tensors: Mapping[str, torch.Tensor], specs: list[TensorSpec],
                 buckets: list[Bucket], works: list[BucketWork], return_local: bool,
                 passthrough: bool = False) -> None:
        self._exchange = exchange
        self._tensors = {n: tensors[n] for n, _, _ in specs}
        self._names = [n for n, _, _ in specs]
        self._buckets = buckets
        self._works = works
        self._return_local = return_local
        self._passthrough = passthrough  # tensors outside every bucket are their own mean
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = False

    def wait(self) -> Any:
        if self._error is not None:
            raise self._error
        if not self._done:
            means: dict[str, torch.Tensor] = {}
            mine: dict[str, torch.Tensor] = {}
            done = 0
            try:
                for bucket, work in zip(self._buckets, self._works):
                    done += 1
                    m, l = work.finish()
                    means.update(zip(bucket.names, m))
                    if l is not None:
                        mine.update(zip(bucket.names, l))
            except BaseException as exc:
                for work in self._works[done:]:
                    work.abandon()
                self._error = exc
                self._works = []
                self._exchange._inflight -= set(self._names)
                raise
            self._exchange._inflight -= set(self._names)
            for name, t in self._tensors.items():
                if name not in means:  # tensors with no values (or a passthrough) travel nowhere
                    means[name] = t.detach().clone() if self._passthrough else torch.empty_like(t)
                    mine[name] = means[name]
            means = {n: means[n] for n in self._names}
            self._result = (means, {n: mine[n] for n in self._names}) if self._return_local else means
            self._done = True
            self._tensors = {}
            self._works = []
        return self._result
