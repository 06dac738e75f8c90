"""``Exchange``: named, compressed, bucketed all-reduces (the mean over ranks) with accounting.

One exchange owns one codec configuration and many *streams*, one per tensor name (and, in
``two_phase``, one per chunk of a bucket plus this rank's server stream), each built with
``dist_soup.compress.build(compressor, seed=seed, rank=rank, stream=stream_id(key), **options)``
where ``stream_id`` is a stable hash of the stream's name, so reruns and resumed runs draw the
same random numbers. A stream keeps its residue across calls with the same name.

The first call on each layout of tensors starts with one small control collective (see
:mod:`dist_soup.comm.agreement`) that checks that all ranks run the same configuration on the
same tensors and carries the input-validation and finiteness status of every rank: an error on
one rank becomes an error on all of them. It travels while this rank encodes its first bucket
(which is undone if the check fails). Later calls on an agreed layout skip it where the mode
carries a status word with its payloads (``allgather``): a rank whose input is not finite, or
rejected, sends zeros and a non-zero word, and every rank raises in ``wait()`` before decoding,
with every stream the call touched put back (``journal``). There a codec that looks at every
value anyway (QSGD's scales; ``Compressor.rejects_nonfinite``) finds a non-finite input while it
encodes, and only that bucket is sent as zeros with the word, so the exchange makes no pass of
its own over the tensors. Other modes keep the per-call control collective. Then the tensors
are cut into buckets (:mod:`dist_soup.comm.buckets`) and each bucket goes through the mode's
collectives (:mod:`dist_soup.comm.modes`); the asynchronous form returns after launching them.

Pipelining: a tensor of more than ``chunk_mb`` megabytes (default 4) is cut into near-equal
consecutive pieces ``f"{name}#{j}"``, each a stream (with its own residue) and a bucket of its
own. Bucket j's collective is launched asynchronously before bucket j+1 is encoded, and
``wait()`` decodes bucket j while the later ones are still on the wire, so encoding, transfer
and decoding overlap instead of running one after the other; ``wait()`` puts the pieces back
together, forming each piece's mean directly in its slice of the result where the mode can.
``out=`` lets the caller supply that result's memory (the DDP hook passes the bucket itself),
and ``local_out=`` that of this rank's own decodes (the engine's solve steps keep it between
steps): a fresh result of tens of megabytes costs, on every call, the page faults of memory the
allocator maps anew (glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` keep freed
memory instead; ``benchmarks/collectives.py`` measures both).

A single process (no initialised torch.distributed, or ``transport="local"``) is a group of one:
every collective is the identity, but tensors are still encoded and decoded, so the compression
error is the same as with P ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ..compress.base import FLOATS, Compressor, LinearCodec
from ..compress.registry import build
from .agreement import (
    NonFiniteError,
    Setting,
    TensorSpec,
    agree_async,
    agree_locally,
    exchange_settings,
    stream_id,
    tensor_settings,
)
from .buckets import Bucket, Piece, megabytes, pieces, plan
from .modes import MODES, REJECTED, BucketWork, Prepared, RemoteNonFinite
from .stats import ExchangeStats
from .transport import Transport, make_transport

STATE_FORMAT = 1
_RESERVED = ("rank", "stream")


class Exchange:
    """Compressed mean over the ranks of a group, keyed by tensor name.

    ``Exchange(compressor, mode="allgather", *, group=None, transport=None, bucket_mb=25.0,
    chunk_mb=4.0, **codec_options)``: ``compressor`` is a codec name of :mod:`dist_soup.compress`,
    ``mode`` one of ``"allgather"``, ``"allreduce"`` (linear codecs only) and ``"two_phase"``;
    ``codec_options`` (``seed`` included) go to every stream the exchange builds. ``bucket_mb``
    caps the fusion of small tensors; ``chunk_mb`` cuts larger tensors into pipelined pieces
    (None or 0: never).
    """

    def __init__(
        self,
        compressor: str,
        mode: str = "allgather",
        *,
        group: Any = None,
        transport: Transport | str | None = None,
        bucket_mb: float = 25.0,
        chunk_mb: float | None = 4.0,
        **codec_options: Any,
    ) -> None:
        if not isinstance(compressor, str):
            raise TypeError(f"compressor must be a codec name (str), got {type(compressor).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        bucket_mb = megabytes("bucket_mb", bucket_mb)
        if chunk_mb is not None:
            chunk_mb = megabytes("chunk_mb", chunk_mb, zero="no pieces")
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
        self.bucket_mb = bucket_mb
        self.chunk_mb = chunk_mb or None
        # At least one value per piece, whatever the megabytes say.
        self._chunk_bytes = max(1, int(self.chunk_mb * 2**20)) if self.chunk_mb else None
        self.options = dict(codec_options)
        self.stats = ExchangeStats()

        probe = self._build(0)  # unknown codecs and options fail here, on every rank alike
        self._rejects_nonfinite = probe.rejects_nonfinite
        if mode == "allreduce" and not isinstance(probe, LinearCodec):
            raise ValueError(
                f"compressor {compressor!r} cannot be summed on the wire, so mode='allreduce' is not "
                "available for it; it supports modes 'allgather' and 'two_phase'"
            )
        self._streams: dict[str, Compressor] = {}
        self._servers: dict[str, Compressor] = {}
        self._known: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._plans: dict[tuple, tuple[list[Bucket], dict[str, list[Piece]]]] = {}
        # Names of an asynchronous call not yet waited for: a stream runs one call at a time
        # (linear codecs keep what decode_sum needs between encode_sum and decode_sum).
        self._inflight: set[str] = set()
        self._journal: dict | None = None  # see _journaling
        self._agreed: set[tuple] = set()  # layouts every rank's control step has accepted
        self._agreed_names: dict[tuple[str, ...], tuple] = {}  # their tensor names -> layout
        self._settings = exchange_settings(
            compressor, self.options, seed, mode, self.transport.world_size, self.bucket_mb, self.chunk_mb
        )
        self._n_settings = len(self._settings) + len(tensor_settings([]))
        self._mode = MODES[mode](self.transport, self.stats, self._stream, self._server)

    # --- streams ------------------------------------------------------------------------------
    def _build(self, sid: int) -> Compressor:
        return build(self.compressor, seed=self.seed, rank=self.transport.rank, stream=sid, **self.options)

    def _stream(self, key: str) -> Compressor:
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = self._build(stream_id(key))
        if self._journal is not None:
            self._journal.setdefault(("stream", key), s.state_dict())
        return s

    def _server(self, key: str) -> Compressor:
        s = self._servers.get(key)
        if s is None:
            s = self._servers[key] = self._build(stream_id("server:" + key))
        if self._journal is not None:
            self._journal.setdefault(("server", key), s.state_dict())
        return s

    @contextmanager
    def _journaling(self, journal: dict | None) -> Iterator[None]:
        """Record into ``journal`` the state of every stream fetched inside the block."""
        outer, self._journal = self._journal, journal
        try:
            yield
        finally:
            self._journal = outer

    def restore(self, journal: Mapping) -> None:
        """Put every stream that ``journal`` (see :meth:`mean_many_async`) recorded back to
        the state it had before the calls that recorded it. Call it once those calls are waited for."""
        for (kind, key), state in journal.items():
            (self._streams if kind == "stream" else self._servers)[key].load_state_dict(state)

    # --- the calls ------------------------------------------------------------------------------
    def mean(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over the ranks of ``tensor`` (compressed by the stream ``name``), identical on
        every rank, with ``tensor``'s shape and dtype."""
        return self.mean_many({name: tensor})[name]

    def mean_many(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        return_local: bool = False,
        out: Mapping[str, torch.Tensor] | None = None,
        local_out: Mapping[str, torch.Tensor] | None = None,
    ) -> Any:
        """Means of many named tensors, fused into buckets of about ``bucket_mb``.

        Returns ``{name: mean}``, or ``(means, locals)`` with ``return_local``, where
        ``locals[name]`` is this rank's own decoded contribution. ``out[name]`` (same shape,
        dtype and device as ``tensors[name]``; it may be that tensor itself) receives the mean
        in place and is what is returned for that name: a tensor cut into pieces is then
        assembled in memory the caller already holds. ``local_out[name]`` (with
        ``return_local``; memory apart from the input and ``out``) does the same for the
        local decode: a caller that keeps such buffers across steps maps no fresh pages.
        """
        return self.mean_many_async(tensors, return_local=return_local, out=out, local_out=local_out).wait()

    def mean_many_async(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        return_local: bool = False,
        out: Mapping[str, torch.Tensor] | None = None,
        local_out: Mapping[str, torch.Tensor] | None = None,
        journal: dict | None = None,
    ) -> ExchangeHandle:
        """Like :meth:`mean_many`, returning once the collectives are launched;
        ``handle.wait()`` returns the same result (``out`` is written during ``wait()``).

        ``journal`` (a dict the caller keeps over several calls) records the state every stream
        had before the first of those calls touched it, so that :meth:`restore` can undo them
        all: a caller that exchanges a step's gradients in several calls and learns in a later
        call that some rank's gradient was not finite puts every residue back (the engine does)."""
        specs: list[TensorSpec] = []
        settings: list[Setting] | None = None
        error: Exception | None = None
        nonfinite: int | None = None
        outs: dict[str, torch.Tensor] = {}
        local_outs: dict[str, torch.Tensor] = {}
        try:
            specs = self._inspect(tensors)
            outs = _check_out(out, tensors)
            local_outs = _check_out(local_out, tensors, "local_out")
            if local_outs and not return_local:
                raise ValueError("local_out is where the local decodes go: it needs return_local=True")
            settings = self._settings + tensor_settings(specs)
        except (TypeError, ValueError) as exc:
            error = exc
        # A group of one with the lossless codec: the mean (and the local decode) is the input,
        # so the handle's copy replaces the encode/pack/decode copies.
        passthrough = self.transport.world_size == 1 and self.compressor == "identity"
        status = None
        if error is not None and isinstance(tensors, Mapping) and tuple(tensors) in self._agreed_names:
            # The others are about to run this agreed layout without a control collective: take
            # part with zeros of it and a status word that makes every rank raise.
            layout = self._agreed_names[tuple(tensors)]
            tensors = {n: torch.zeros(s, dtype=d, device=dev) for n, s, d, dev in layout}
            specs, outs, local_outs, status = [(n, s, d) for n, s, d, _ in layout], {}, {}, REJECTED
        else:
            layout = tuple((n, s, d, tensors[n].device) for n, s, d in specs if math.prod(s) > 0 and not passthrough)
        # A layout that every rank has agreed on in an earlier call needs no control collective:
        # each rank's status word (non-finite, rejected or fine) travels with its payloads where
        # the mode carries it, else in a tiny all-reduce launched with them and waited for (first)
        # in wait(), so that nothing waits for it before the payloads leave.
        fast = self.transport.world_size > 1 and layout in self._agreed and (error is None or status == REJECTED)
        # Where each bucket's status word travels with its payloads, a codec that looks at every
        # value anyway (QSGD's scales) finds a NaN or inf while it encodes (the mode then sends
        # zeros and the word for that bucket): no pass over the tensors here.
        found_in_encode = fast and self._mode.carries_status and self._rejects_nonfinite
        if error is None and not found_in_encode:
            nonfinite = _first_nonfinite([tensors[s[0]] for s in specs])
        ctl0 = time.perf_counter()
        if fast:
            if status is None:
                status = 0 if nonfinite is None else nonfinite + 1
            check = lambda: (0, 0)  # noqa: E731
        elif self.transport.world_size > 1:
            # The control collective travels while this rank encodes its first bucket.
            check = agree_async(
                self.transport, settings, specs, n_settings=self._n_settings, local_error=error, nonfinite=nonfinite
            )
        else:
            agree_locally(error, nonfinite, specs)
            check = lambda: (0, 0)  # noqa: E731
        self.stats.comm_s += time.perf_counter() - ctl0
        self.stats.calls += 1

        pending = [True]

        def checked() -> None:
            """Wait for the control collective (once); raises on every rank alike."""
            if not pending:
                return
            pending.clear()
            t0 = time.perf_counter()
            try:
                nbytes, ncoll = check()
            finally:
                self.stats.comm_s += time.perf_counter() - t0
            self.stats.overhead_bytes += nbytes
            self.stats.collectives += ncoll
            if self.transport.world_size > 1 and len(layout) == len(specs):
                self._agreed.add(layout)
                self._agreed_names[tuple(n for n, _, _ in specs)] = layout
            for name, shape, dtype in specs:
                self._known.setdefault(name, (shape, dtype))
                self.stats.dense_bytes += 4 * math.prod(shape)

        if not fast and (error is not None or nonfinite is not None):
            checked()  # raises on this rank (and, through the control collective, on every rank)

        cached = self._plans.get(layout)
        if cached is None:
            checked()  # a new layout: planning (which names streams) waits for the agreement
            if len(self._plans) >= 256:  # callers with ever-new layouts: keep the cache bounded
                self._plans.clear()
            cached = self._plans[layout] = self._plan(layout)
        buckets, cuts = cached
        names = {n for n, _, _ in specs} | {p.name for cut in cuts.values() for p in cut}
        self._inflight |= names
        if status and status != REJECTED:
            # This rank's input is not finite: it still sends (zeros, so no codec sees the
            # values), and its status word makes every rank drop the call and undo it.
            tensors = {n: torch.zeros_like(t) for n, t in tensors.items()}
        inputs: dict[str, torch.Tensor] = {}
        for n, cut in cuts.items():
            flat = tensors[n].detach().reshape(-1)
            inputs.update((p.name, p.of(flat)) for p in cut)
        extra: dict[str, Any] = {}
        # Where the mode carries status words, every call's payloads carry them, the first call of
        # a layout too: a codec that refuses a finite input while encoding (QSGD's l2 scale
        # overflowing) then stops every rank, where the control collective has already said "fine".
        if self.transport.world_size > 1 and self._mode.carries_status:
            status = status or 0  # a first call gets here only with every rank's input fine

            def status_of(entry: str) -> int:
                """The status word of a non-finite bucket entry: its tensor's index + 1."""
                owner = next((n for n, cut in cuts.items() if any(p.name == entry for p in cut)), entry)
                return 1 + next(i for i, (n, _, _) in enumerate(specs) if n == owner)

            extra = {"status": status, "status_of": status_of}
        status_work = None
        if fast and not self._mode.carries_status:
            me = self.transport.rank + 1
            word = torch.tensor(
                [
                    me if status and status != REJECTED else 0,
                    status if status != REJECTED else 0,
                    me if status == REJECTED else 0,
                ],
                dtype=torch.int64,
                device=self.transport.device,
            )
            status_work = self.transport.all_reduce_async_(word, "max")
            self.stats.overhead_bytes += 24
            self.stats.collectives += 1

        def prepare(b: Bucket) -> Prepared:
            return self._mode.prepare(
                b,
                [inputs[e.name] if e.name in inputs else tensors[e.name].detach() for e in b.entries],
                return_local,
                **extra,
            )

        if extra and journal is None:
            journal = {}  # a call that may learn of a non-finite input only in wait() must be undoable
        works: list[BucketWork] = []
        ready: list[Prepared] = []
        first = {} if journal is None else journal  # what the first bucket's encode touches
        try:
            with self._journaling(first):
                if buckets and self._mode.encodes_locally:
                    ready.append(prepare(buckets[0]))  # encoding only: no collective yet
            try:
                checked()
            except ValueError:  # another rank's input was rejected: undo this rank's encode
                self.restore(first)
                raise
            with self._journaling(journal):
                # Bucket j+1 is prepared (its input-only control collectives launched) before
                # bucket j's payload goes out, and each launch returns with its collective in
                # flight, so bucket j is on the wire while bucket j+1 is being encoded.
                if buckets and not ready:
                    ready.append(prepare(buckets[0]))
                for j in range(len(buckets)):
                    if j + 1 < len(buckets):
                        ready.append(prepare(buckets[j + 1]))
                    works.append(ready.pop(0).launch())
        except BaseException:
            for work in works:
                work.abandon()
            for p in ready:
                p.abandon()
            self._inflight -= names
            raise
        return ExchangeHandle(
            self,
            tensors,
            specs,
            buckets,
            works,
            return_local,
            passthrough,
            cuts,
            names,
            outs,
            journal,
            error,
            status_work,
            local_outs,
        )

    def _plan(self, layout: tuple) -> tuple[list[Bucket], dict[str, list[Piece]]]:
        """Buckets of a call's layout, and the pieces of every tensor cut into pieces."""
        cuts: dict[str, list[Piece]] = {}
        specs = []
        for name, shape, dtype, device in layout:
            cut = pieces(name, math.prod(shape), torch.empty(0, dtype=dtype).element_size(), self._chunk_bytes)
            if not cut:
                specs.append((name, shape, dtype, device))
                continue
            cuts[name] = cut
            for p, _, k in cut:
                if p in self._known and self._known[p] != ((k,), dtype):
                    raise ValueError(
                        f"tensor {name!r} is cut into pieces named {name!r}#j, but a stream {p!r} already "
                        f"exists with shape {self._known[p][0]} and dtype {self._known[p][1]}; rename one of them"
                    )
                specs.append((p, (k,), dtype, device))
        given = {n for n, _, _, _ in layout}
        clash = [p.name for cut in cuts.values() for p in cut if p.name in given]
        if clash:
            raise ValueError(
                f"tensor name {clash[0]!r} is also the name of a piece of a larger tensor "
                f"(pieces are named name#j); rename it"
            )
        for p, shape, dtype, _ in specs:
            self._known.setdefault(p, (shape, dtype))
        solo = {p.name for cut in cuts.values() for p in cut}
        return plan(specs, int(self.bucket_mb * 2**20), solo=solo), cuts

    def _inspect(self, tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping name -> tensor, got {type(tensors).__name__}")
        specs = []
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in FLOATS:
                raise ValueError(f"tensor {name!r} has dtype {t.dtype}; allowed: {', '.join(map(str, FLOATS))}")
            if name in self._inflight:
                raise ValueError(
                    f"tensor {name!r} is still in flight in an earlier mean_many_async call; "
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
        return (
            f"Exchange({self.compressor!r}, mode={self.mode!r}, bucket_mb={self.bucket_mb}, "
            f"chunk_mb={self.chunk_mb}, "
            f"seed={self.seed}{opts}, transport={self.transport!r})"
        )


def _into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst`` holding ``src`` (no copy when a mode already formed it there)."""
    if src.data_ptr() != dst.data_ptr() or src.numel() != dst.numel():
        dst.copy_(src.reshape(dst.shape))
    return dst


def _check_out(
    out: Mapping[str, torch.Tensor] | None, tensors: Mapping[str, torch.Tensor], what: str = "out"
) -> dict[str, torch.Tensor]:
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(f"{what} must be a mapping name -> tensor, got {type(out).__name__}")
    for name, o in out.items():
        if name not in tensors:
            raise ValueError(f"{what} names {name!r}, which is not one of the tensors of this call")
        t = tensors[name]
        if not isinstance(o, torch.Tensor) or (o.shape, o.dtype, o.device) != (t.shape, t.dtype, t.device):
            got = (tuple(o.shape), o.dtype, o.device) if isinstance(o, torch.Tensor) else type(o).__name__
            raise ValueError(
                f"{what}[{name!r}] must be a tensor of shape {tuple(t.shape)}, dtype {t.dtype} and "
                f"device {t.device} (like the input), got {got}"
            )
        if not o.is_contiguous():
            raise ValueError(f"{what}[{name!r}] must be contiguous")
    return dict(out)


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


def wait_all(handles: list[ExchangeHandle]) -> tuple[list[Any], NonFiniteError | None]:
    """Wait for every handle, whatever happens to the others: a launched collective must
    complete on every rank before anything else is issued. Returns the results (None where a
    handle failed) and the first :class:`NonFiniteError` (some rank's input was not finite; every
    rank gets it from the same handles); any other error is raised once all are waited for."""
    results: list[Any] = []
    nonfinite: NonFiniteError | None = None
    failure: BaseException | None = None
    for handle in handles:
        try:
            results.append(handle.wait())
        except NonFiniteError as exc:
            results.append(None)
            nonfinite = nonfinite or exc
        except BaseException as exc:
            results.append(None)
            failure = failure or exc
    if failure is not None:
        raise failure
    return results, nonfinite


class ExchangeHandle:
    """An exchange in flight; ``wait()`` returns what :meth:`Exchange.mean_many` returns."""

    def __init__(
        self,
        exchange: Exchange,
        tensors: Mapping[str, torch.Tensor],
        specs: list[TensorSpec],
        buckets: list[Bucket],
        works: list[BucketWork],
        return_local: bool,
        passthrough: bool = False,
        cuts: Mapping[str, list[Piece]] | None = None,
        streams: set[str] | None = None,
        out: Mapping[str, torch.Tensor] | None = None,
        journal: dict | None = None,
        local_error: Exception | None = None,
        status_work: Any = None,
        local_out: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._exchange = exchange
        self._status_work = status_work  # the ranks' status words, when they travel on their own
        self._journal = journal
        self._local_error = local_error  # this rank's rejected input, raised once all ranks know
        self._out = dict(out or {})
        self._local_out = dict(local_out or {})
        # piece name -> (tensor name, piece), for putting the pieces back together
        self._piece_of = {p.name: (n, p) for n, cut in (cuts or {}).items() for p in cut}
        self._streams = set(streams) if streams is not None else {n for n, _, _ in specs}
        self._tensors = {n: tensors[n] for n, _, _ in specs}
        self._names = [n for n, _, _ in specs]
        self._buckets = buckets
        self._works = works
        self._return_local = return_local
        self._passthrough = passthrough  # tensors outside every bucket are their own mean
        self._result: Any = None
        self._error: BaseException | None = None
        self._done = False

    def _status_error(self, statuses: list[int]) -> Exception:
        """The error every rank raises when some rank's status word is not 0."""
        rank = self._exchange.transport.rank
        if self._local_error is not None:
            return self._local_error
        rejected = [r for r, s in enumerate(statuses) if s == REJECTED]
        if rejected:
            return ValueError(
                f"rank {rejected[0]} rejected its input to this exchange call (its own error says "
                f"why); rank {rank} stops too, and no residue changed"
            )
        r = next(r for r, s in enumerate(statuses) if s)
        i = statuses[r] - 1
        name = self._names[i] if 0 <= i < len(self._names) else f"#{i}"
        return NonFiniteError(
            f"tensor {name!r} holds non-finite values (inf or NaN) on rank {r}; every rank "
            "drops this exchange call and no residue changed"
        )

    def _target(self, name: str, means: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Where the mean of bucket entry ``name`` finally lives, when that memory exists already."""
        if name not in self._piece_of:
            return self._out.get(name)
        n, piece = self._piece_of[name]
        return piece.of(means[n])

    def wait(self) -> Any:
        if self._error is not None:
            raise self._error
        if not self._done:
            # two_phase compresses again (server streams) while it finishes
            with self._exchange._journaling(self._journal):
                self._finish()
        return self._result

    def _finish(self) -> None:
        means: dict[str, torch.Tensor] = {}
        mine: dict[str, torch.Tensor] = {}
        # Tensors cut into pieces are assembled in place as their pieces arrive (while the
        # later pieces are still in flight), not concatenated at the end.
        whole = {n for n, _ in self._piece_of.values()}
        for n in whole:
            t = self._tensors[n]
            means[n] = self._out[n] if n in self._out else torch.empty(t.shape, dtype=t.dtype, device=t.device)
            if self._return_local:
                given = self._local_out.get(n)
                mine[n] = given if given is not None else torch.empty(t.shape, dtype=t.dtype, device=t.device)
        done = 0
        try:
            if self._status_work is not None:
                bad, index, rejected = self._status_work.wait().cpu().tolist()
                if bad or rejected:  # [rank + 1 of a non-finite input, its tensor + 1, rank + 1 rejected]
                    statuses = [0] * self._exchange.transport.world_size
                    if bad:
                        statuses[bad - 1] = index
                    if rejected:
                        statuses[rejected - 1] = REJECTED
                    raise RemoteNonFinite(statuses)
            works = self._works
            if works:
                works[0].advance()
            for j, (bucket, work) in enumerate(zip(self._buckets, works)):
                done = j
                if j + 1 < len(works):
                    works[j + 1].advance()  # its next round goes out before bucket j is decoded
                targets = [self._target(name, means) for name in bucket.names]
                m, l = work.finish(targets if any(t is not None for t in targets) else None)
                for i, name in enumerate(bucket.names):
                    if name not in self._piece_of:
                        means[name] = _into(self._out[name], m[i]) if name in self._out else m[i]
                        if l is not None:
                            mine[name] = l[i]
                        continue
                    n, piece = self._piece_of[name]
                    _into(piece.of(means[n]), m[i].reshape(-1))
                    if l is not None:
                        piece.of(mine[n]).copy_(l[i].reshape(-1))
                done = j + 1
        except BaseException as exc:
            for work in self._works[done:]:
                work.abandon()
            self._works = []
            self._exchange._inflight -= self._streams
            if isinstance(exc, RemoteNonFinite):
                if self._journal is not None:
                    self._exchange.restore(self._journal)
                exc = self._status_error(exc.statuses)
                self._error = exc
                raise exc from None
            self._error = exc
            raise
        self._exchange._inflight -= self._streams
        for name, t in self._tensors.items():
            if name not in means:  # tensors with no values (or a passthrough) travel nowhere
                if name in self._out:
                    dst = self._out[name]
                    if self._passthrough:
                        if self._return_local:  # before dst (which may be t) is written
                            mine[name] = t.detach().clone()
                        if dst.data_ptr() != t.data_ptr():
                            dst.copy_(t.detach())
                    means[name] = dst
                    mine.setdefault(name, dst)
                else:
                    means[name] = t.detach().clone() if self._passthrough else torch.empty_like(t)
                    mine[name] = means[name]
        means = {n: means[n] for n in self._names}
        for name, dst in self._local_out.items():
            mine[name] = _into(dst, mine[name])
        self._result = (means, {n: mine[n] for n in self._names}) if self._return_local else means
        self._done = True
        self._tensors = {}
        self._works = []
