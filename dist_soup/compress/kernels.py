"""Fused elementwise kernels for the quantizing codecs, compiled once and cached.

Every kernel here is a plain torch function (the *eager* path). ``run(fn, args, static)`` calls
it; on first use for one static configuration (bits, bucket size, norm, output dtype) it compiles
``fn`` with the configuration as constants and tensor lengths marked dynamic, so one compilation
serves every tensor length; inductor turns it into one or two vectorized C++ loops on CPU
(Triton on GPU). If compilation is unavailable or fails, it warns once and runs the same
function eagerly. Compilation is lazy (first call) and cached for the process.
Both paths compute the same integer hash and the same float operations, so for one key they
give the same bytes with ``norm="max"`` (checked by the tests). With ``norm="l2"`` the bucket
sums of squares may be added in a different order (vectorized reduction), so a scale can differ
in its last bit and, rarely, flip one stochastic rounding; each path alone is reproducible.

Stochastic rounding needs one uniform number per value. ``torch.rand_like`` alone runs near
0.9 GB/s on one core; a counter-based hash of ``(key, index)`` is pure arithmetic and fuses
with the quantization, so no random tensor is ever materialised. The hash is two rounds of the
murmur3 32-bit finaliser (multiply / xor-shift) in int32 lanes: a product keeps its low 32 bits
(two's-complement wrap-around: what vector multiplies, Triton and the compilers torch is built
with do, though C++ leaves signed overflow undefined; a test pins the draws to the unsigned
hash), and right shifts are masked to act as logical shifts, so the bits are those of the
unsigned 32-bit hash. In int32 the hash vectorizes twice as wide as in int64 and its multiplies
are native: the uniform draw costs a third of what the int64 form of the same hash costs on
the project's CPU machine.

Environment: ``DIST_SOUP_COMPILE=0`` forces the eager path everywhere (tests use it so they do
not pay compile time); ``backend="eager"`` on a codec does the same for one stream.
"""

from __future__ import annotations

import os
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D  # murmur3-style odd multipliers, both below 2**31 so they fit an int32 operand
_C2 = 0x68E31DA5
_INV24 = 1.0 / (1 << 24)

# Below this many values a compiled call is not worth its guards (and sizes 0/1 would be
# specialised by dynamo, costing a recompilation): run eagerly, same result. Above it a compiled
# call beats the eager ops (a few of them per value group) already at a few thousand values.
EAGER_BELOW = 1 << 11

BACKENDS = ("auto", "compiled", "eager")


def _fmix(h: torch.Tensor) -> torch.Tensor:
    """The murmur3 finaliser on int32 lanes holding unsigned 32-bit values (``>>`` is arithmetic
    on int32, so each shift is masked down to the bits a logical shift keeps)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _C2
    return h ^ ((h >> 16) & 0xFFFF)


def uniform(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) on a 2**-24 grid, a pure function of (key, index).

    ``index`` is int64 (taken modulo 2**32: < 2**32 per distinct draw), ``key`` an int64 tensor
    whose first two entries are the 32-bit halves. With ``fmix`` murmur3's finaliser on unsigned
    32-bit words: ``u = (fmix(fmix(index + key0) ^ key1) >> 8) / 2**24``.
    """
    k = key[:2].to(torch.int32)  # int64 -> int32 keeps the low 32 bits
    h = _fmix(index.to(torch.int32) + k[0])
    h = _fmix(h ^ k[1])
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * _INV24


def split_key(key: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """A 63-bit stream key as the int64 tensor the kernels take: two 32-bit halves and the
    index offset of the first value (for a tail encoded apart from the whole buckets).

    A tensor, not Python ints, so the compiled kernels do not specialise (and recompile) on it.
    """
    return torch.tensor([key & _M32, (key >> 32) & _M32, offset], dtype=torch.int64, device=device)


# --- QSGD -------------------------------------------------------------------------------------
# The kernels take whole buckets, a (nb, d) view of the input (the caller encodes a partial last
# bucket separately, zero padded), so the compiled loops carry no bounds masks. Codes travel in
# 32-bit words: the ``per = 32 // bits`` values that share word j of a bucket lie ``q = d / per``
# apart (word j holds values j, j + q, ..., value ``j + t*q`` in bits ``[bits*t, bits*(t+1))``).
# Every value group is then a contiguous slice, so the encoder is one vectorized loop that never
# materialises the levels, and the decoders read whole int32 vectors: with bytes instead, every
# 8-lane float vector would need an 8-byte partial load and a widening, which made decoding
# four times slower on the project's CPU machine (the mean of two payloads: 3.3 against 0.74 ms
# per million values on one core).
def _norms(xb: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "max":
        return xb.abs().amax(dim=1)
    return xb.square().sum(dim=1).sqrt()


def _inv(scale: torch.Tensor, s: int) -> torch.Tensor:
    return torch.where(scale > 0, s / scale, torch.zeros_like(scale))[:, None]


def _level(v: torch.Tensor, inv: torch.Tensor, index: torch.Tensor, key: torch.Tensor, s: int) -> torch.Tensor:
    """Unsigned level ``floor(s|v|/n + u)`` in [0, s], u uniform from (key, index): E = s|v|/n."""
    # The clamp only catches float round-off of |v|*s/n just above s when |v| == n.
    return torch.floor(v.abs() * inv + uniform(index, key)).clamp(max=s)


def _index(nb: int, d: int, key: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Global value index of each bucket start (key[2] is the first bucket's offset)."""
    return torch.arange(nb, dtype=torch.int64, device=device)[:, None] * d + key[2]


def qsgd_encode(
    xb: torch.Tensor, key: torch.Tensor, *, bits: int, d: int, norm: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole buckets (nb, d) -> (fp32 scale per bucket, codes ``sign*level + s`` packed into
    nb*d*bits/32 int32 words)."""
    s = (1 << (bits - 1)) - 1
    per = 32 // bits
    q = d // per
    xb = xb.to(torch.float32)
    scale = _norms(xb, norm)
    inv = _inv(scale, s)
    base = _index(xb.shape[0], d, key, xb.device) + torch.arange(q, dtype=torch.int64, device=xb.device)
    packed = None
    for t in range(per):
        v = xb[:, t * q : (t + 1) * q]
        lvl = _level(v, inv, base + t * q, key, s)
        code = torch.where(v < 0, s - lvl, s + lvl).to(torch.int32)
        # the top group may reach the sign bit: the word is the same 32 bits either way
        packed = code if packed is None else packed | (code << (bits * t))
    assert packed is not None  # per >= 1
    return scale, packed.reshape(-1)


def _groups(scale: torch.Tensor, packed: torch.Tensor, bits: int, d: int) -> list[torch.Tensor]:
    """The value groups of dense QSGD buckets in float32: group t is an (nb, q) tensor whose
    entry (b, j) is value ``t*q + j`` of bucket b, ``((word j >> bits*t) & mask) - s`` times
    ``scale_b / s``.

    One slice per group with its shift a constant; the callers stack the groups along a middle
    axis once, at the end, so that compiled it is a single loop that reads whole int32 vectors
    and writes each output value once (a shift tensor broadcast along that axis, or a stack per
    payload summed afterwards, compiles to per-value index arithmetic: two to four times slower)."""
    s = (1 << (bits - 1)) - 1
    per = 32 // bits
    words = packed.view(scale.shape[0], d // per)
    f = (scale / s)[:, None]
    mask = (1 << bits) - 1
    return [(((words >> (bits * t)) & mask).to(torch.float32) - s) * f for t in range(per)]


def qsgd_decode(scale: torch.Tensor, packed: torch.Tensor, *, bits: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`qsgd_encode`: ``(code - s) * scale / s`` for all nb*d values, in ``dtype``."""
    return torch.stack(_groups(scale, packed, bits, d), dim=1).to(dtype).reshape(-1)


def _mean_buckets(parts: tuple[torch.Tensor, ...], bits: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of the dense payloads ``parts = (scale_0, packed_0, scale_1, packed_1, ...)`` as an
    (nb, per, q) tensor in ``dtype`` (value ``t*q + j`` of bucket b at (b, t, j))."""
    acc_type = torch.float64 if dtype == torch.float64 else torch.float32
    count = len(parts) // 2
    decoded = [_groups(scale, packed, bits, d) for scale, packed in zip(parts[::2], parts[1::2])]
    means = []
    for t in range(len(decoded[0])):
        acc = decoded[0][t].to(dtype).to(acc_type)
        for groups in decoded[1:]:
            acc = acc + groups[t].to(dtype).to(acc_type)
        means.append((acc / count).to(dtype))
    return torch.stack(means, dim=1)


def qsgd_decode_mean(*parts: torch.Tensor, bits: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of several dense QSGD payloads of one tensor, ``parts = (scale_0, packed_0,
    scale_1, packed_1, ...)``, in one pass: each decode (rounded to ``dtype``, as
    :func:`qsgd_decode` gives it) summed in order in float32 (float64 for float64), divided by
    the count, cast to ``dtype``: the float operations of decoding each and adding them up."""
    return _mean_buckets(parts, bits, d, dtype).reshape(-1)


def qsgd_decode_mean_into(out: torch.Tensor, *parts: torch.Tensor, bits: int, d: int, dtype: torch.dtype) -> None:
    """:func:`qsgd_decode_mean` written into ``out`` (its first ``out.numel()`` values), the same
    bits. Nothing is returned, and a tensor of whole buckets is written through a view of its
    own shape: compiled, that is one loop storing each mean straight into ``out``'s memory (a
    returned or sliced result would make the compiler write a temporary and copy it twice)."""
    mean = _mean_buckets(parts, bits, d, dtype)
    if out.numel() == mean.numel():
        out.view(mean.shape).copy_(mean)
    else:  # a zero-padded last bucket: only its first values are the tensor's
        out.view(-1).copy_(mean.reshape(-1)[: out.numel()])


def qsgd_levels(
    xb: torch.Tensor, scale: torch.Tensor, key: torch.Tensor, *, s: int, d: int, out: torch.dtype
) -> torch.Tensor:
    """Signed integer levels of whole buckets (nb, d) against given (shared) bucket scales."""
    xb = xb.to(torch.float32)
    index = _index(xb.shape[0], d, key, xb.device) + torch.arange(d, dtype=torch.int64, device=xb.device)
    lvl = _level(xb, _inv(scale, s), index, key, s)
    return torch.where(xb < 0, -lvl, lvl).to(out).reshape(-1)


# --- compilation cache --------------------------------------------------------------------------
_lock = threading.Lock()
_cache: dict[tuple, Callable[..., Any]] = {}
_failed: set[tuple] = set()
_warned = False


def compile_enabled() -> bool:
    return os.environ.get("DIST_SOUP_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def _warn_once(exc: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"dist_soup.compress: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
            "using the eager kernels (same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )


def _own_copy(fn: Callable[..., Any], static: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` with ``static`` as its keyword defaults, on a code object of its own.

    Dynamo keeps its compiled graphs per code object, at most ``recompile_limit`` (8) of them,
    and runs the function eagerly past that with only a log line. Through ``functools.partial``
    every kernel and configuration would share one code object (dynamo's wrapper of partials),
    so a process using more than a few (three bit widths, two norms, the means of 2 and of 4
    payloads) would silently lose the compiled kernels. A copy of the code per configuration
    keeps each one's graph apart."""
    clone = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **static}
    clone.__doc__ = fn.__doc__
    return clone


def run(
    fn: Callable[..., Any], args: tuple, static: dict[str, Any], backend: str = "auto", numel: int | None = None
) -> Any:
    """Run kernel ``fn(*args, **static)``: compiled and cached per static config, or eagerly.

    ``backend``: "eager" never compiles; "compiled" and "auto" compile (falling back to eager,
    with one warning, if compilation fails); ``DIST_SOUP_COMPILE=0`` makes every backend eager.
    Small inputs (``numel < EAGER_BELOW``) run eagerly under "auto".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    eager = (
        backend == "eager" or not compile_enabled() or (backend == "auto" and numel is not None and numel < EAGER_BELOW)
    )
    ckey = (fn.__name__, tuple(sorted(static.items())), args[0].device.type)
    if eager or ckey in _failed:
        return fn(*args, **static)
    compiled = _cache.get(ckey)
    if compiled is None:
        with _lock:
            compiled = _cache.get(ckey)
            if compiled is None:
                # The static config is bound as constants (dynamic=True would turn these ints
                # into symbols and lose vectorization); only tensor lengths are marked dynamic.
                compiled = torch.compile(_own_copy(fn, static), dynamic=False)
                _cache[ckey] = compiled
    try:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        with torch.no_grad():
            return compiled(*args)
    except Exception as exc:  # any compiler/toolchain failure: fall back, same math
        _failed.add(ckey)
        _warn_once(exc)
        return fn(*args, **static)


# --- bit streams --------------------------------------------------------------------------------
def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A uint8 0/1 tensor as bytes, MSB first, the last byte zero padded."""
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    w = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) * w).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(data: torch.Tensor, nbits: int) -> torch.Tensor:
    """The first ``nbits`` bits of ``data`` (MSB first) as a uint8 0/1 tensor."""
    sh = torch.arange(7, -1, -1, device=data.device, dtype=torch.uint8)
    return ((data[:, None] >> sh) & 1).reshape(-1)[:nbits]


# --- AdaComp ---------------------------------------------------------------------------------
def mask_positions(mask: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """Sorted int64 positions of the True flags of a bool tensor whose length is a multiple of 8.

    ``nonzero`` over n flags costs about as much as the rest of AdaComp's encoder; scanning the
    flags as int64 words first touches n/8 elements, then only the non-zero words are expanded.
    When most words hold a flag (or the caller expects so: ``dense``) the plain scan is cheaper.
    """
    if dense:
        return mask.nonzero().view(-1)
    words = mask.view(torch.uint8).view(torch.int64)
    w = words.nonzero().view(-1)
    if w.numel() * 4 > words.numel():
        return mask.nonzero().view(-1)
    f = mask.view(-1, 8)[w].view(-1).nonzero().view(-1)
    return w[f >> 3] * 8 + (f & 7)
