"""QSGD (Alistarh et al., 2017): stochastic quantization to s levels per bucket, bit-packed.

For each bucket v of d consecutive values with scale ``n(v)`` (``max|v_i|`` by default, or
``||v||_2``) and ``s = 2**(bits-1) - 1`` levels::

    l_i = floor(s |v_i| / n + u_i),  u_i ~ U[0, 1)        (so P[round up] = frac(s |v_i| / n))
    Q(v_i) = n * sign(v_i) * l_i / s,                     E[Q(v)] = v

With l2 scaling the variance is bounded: ``E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2``.

Wire formats (``WIRE_FORMATS``, the first meta field):

* ``dense`` (default): ``sign * level + s`` in ``bits`` bits, ``32 / bits`` values per
  little-endian 32-bit word, plus one fp32 scale per bucket: ``bits + 32 / d`` bits per value
  (4.0625 at 4 bits, d = 512; a partial last bucket is zero padded, at most ``d * bits / 8``
  bytes). Inside a bucket, word j holds values j, j + d/per, ... (per = 32 / bits) from its
  low bits up, which keeps the fused kernels vectorized (:mod:`.kernels`).
* ``elias`` (``coding="elias"``): variable length, for few levels. After the scales, the
  Elias-omega codes of the gaps between nonzero positions, then those of their levels, then one
  sign bit per nonzero. Sparse level vectors (2 bits, or l2 scaling) cost far fewer bits.
  Encoding and decoding are vectorized (decoding finds every code boundary at once by pointer
  doubling; see :func:`omega_decode`), at the price of scratch memory of about 50 bytes per
  stream bit and about 0.1 GB/s: a format for sparse level vectors, not for 8-bit max scaling.
* ``raw``: tensors with fewer than ``min_numel`` values travel as they are (the paper sent
  tensors under about 10K values uncompressed; the header alone outweighs the saving on tiny
  ones). Default ``min_numel = 1024``.

Randomness is counter-based (see :mod:`.kernels`): the draw for value i at this stream's step t
is a hash of ``(mix(seed, rank, stream, t), i)``, so runs are reproducible and resuming from
``state_dict`` continues the same sequence.

As a :class:`~.base.LinearCodec` (``mode="allreduce"``) QSGD uses a *shared* scale: every rank
offers its bucket scales, the collective takes their elementwise max, each rank quantizes
against it (still unbiased: ``|v_i| <= shared n``), the integer levels are summed in the
smallest integer type that holds ``P * s``, and ``decode_sum`` returns ``total * n / (s P)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import kernels
from .base import FLOATS, LinearCodec, NonFiniteInput, check_choice, check_int, check_out, flat_input
from .kernels import pack_bits, unpack_bits
from .payload import CODEC_IDS, Payload

WIRE_FORMATS = {"raw": 0, "dense": 1, "elias": 2}
NORMS = {"max": 0, "l2": 1}
CODINGS = ("dense", "elias")
# Largest value Elias-omega codes here (gaps up to the tensor size): codes stay within 63 bits.
_OMEGA_MAX_BITS = 63
_OMEGA_MAX_GROUP = 41  # widest group a code of a value below 2**40 contains (40 bits + slack)


def sum_dtype(world_size: int, s: int, int16: bool = True) -> torch.dtype:
    """Smallest integer dtype that holds any sum of ``world_size`` levels in [-s, s].

    ``int16=False`` skips int16: gloo's all_reduce rejects it ("Invalid scalar type").
    """
    m = world_size * s
    if m <= 127:
        return torch.int8
    if m <= 32767 and int16:
        return torch.int16
    if m <= 2**31 - 1:
        return torch.int32
    return torch.int64


# --- Elias omega, vectorized -----------------------------------------------------------------
def _bitlen(x: torch.Tensor) -> torch.Tensor:
    """Number of binary digits of positive int64 values (exact: frexp of float64 < 2**53)."""
    return torch.frexp(x.to(torch.float64)).exponent.to(torch.int64)


def omega_codes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elias-omega code of each positive int64 value (< 2**40): (code bits as int64, length).

    Omega(N): start from "0"; while N > 1, prepend N in binary and set N = bitlen(N) - 1.
    The loop runs at most 6 times for N < 2**40 and is vectorized over all values.
    """
    if values.numel() and int(values.min()) < 1:
        raise ValueError("Elias-omega codes positive integers only")
    code = torch.zeros_like(values)
    length = torch.ones_like(values)
    cur = values.clone()
    for _ in range(6):
        more = cur > 1
        if not bool(more.any()):
            break
        bl = _bitlen(cur)
        code = torch.where(more, code | (cur << length), code)
        length = torch.where(more, length + bl, length)
        cur = torch.where(more, bl - 1, cur)
    return code, length


def write_bits(codes: torch.Tensor, lengths: torch.Tensor, chunk: int = 1 << 18) -> tuple[torch.Tensor, int]:
    """Concatenate variable-length codes (MSB first) into bytes; returns (uint8 tensor, bit count).

    Works ``chunk`` codes at a time so the (codes x width) scratch stays small.
    """
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.uint8, device=codes.device), 0
    pieces = []
    for start in range(0, codes.numel(), chunk):
        c, ln = codes[start : start + chunk], lengths[start : start + chunk]
        width = int(ln.max())
        j = torch.arange(width, device=codes.device)
        # bit j of a code of length L is bit (L-1-j) of its value; only j < L exist.
        sh = (ln[:, None] - 1 - j).clamp_(min=0)
        bits = ((c[:, None] >> sh) & 1).to(torch.uint8)
        pieces.append(bits[j < ln[:, None]])  # row-major: codes in order, each MSB first
    return pack_bits(torch.cat(pieces) if len(pieces) > 1 else pieces[0]), total


def _windows(data: torch.Tensor) -> torch.Tensor:
    """56-bit big-endian window starting at every byte (zero past the end), as int64."""
    b = torch.cat([data, data.new_zeros(7)]).to(torch.int64)
    m = data.numel()
    w = torch.zeros(m, dtype=torch.int64, device=data.device)
    for k in range(7):
        w = (w << 8) | b[k : k + m]
    return w


def _read(win: torch.Tensor, pos: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """``width`` (<= 49) bits starting at bit ``pos`` of the stream behind ``win``."""
    w = win[pos >> 3] << (pos & 7)
    return (w >> (56 - width)) & ((1 << width) - 1)


def omega_decode(data: torch.Tensor, nbits: int, count: int) -> tuple[torch.Tensor, int]:
    """Decode ``count`` consecutive omega codes from the start of a bit stream, vectorized.

    Returns (values, bits consumed). A code's length depends only on the bits at its start, so
    the length of "a code starting at p" is computed for every bit position p at once (a fixed
    number of rounds); the true code starts are the chain 0 -> next(0) -> ..., found for all
    codes together by pointer doubling in log2(count) rounds. Malformed streams (a chain that
    runs off the end or needs an absurd group width) raise ``ValueError``.
    """
    dev = data.device
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev), 0
    if nbits <= 0:
        raise ValueError("Elias stream is empty but codes are declared")
    win = _windows(data)
    pos = torch.arange(nbits, dtype=torch.int64, device=dev)
    val = torch.ones(nbits, dtype=torch.int64, device=dev)
    end = torch.full((nbits,), -1, dtype=torch.int64, device=dev)  # -1: not finished
    bad = torch.zeros(nbits, dtype=torch.bool, device=dev)
    for _ in range(8):
        live = (end < 0) & ~bad
        if not bool(live.any()):
            break
        inside = pos < nbits
        bit = torch.where(inside, _read(win, pos.clamp(max=nbits - 1), torch.ones_like(pos)), 0)
        stop = live & inside & (bit == 0)
        end = torch.where(stop, pos + 1, end)
        width = val + 1
        grow = live & inside & (bit == 1)
        bad = bad | (live & ~inside) | (grow & ((width > _OMEGA_MAX_GROUP) | (pos + width > nbits)))
        grow = grow & ~bad
        safe_w = torch.where(grow, width, torch.ones_like(width))
        nv = _read(win, pos.clamp(max=nbits - 1), safe_w)
        val = torch.where(grow, nv, val)
        pos = torch.where(grow, pos + width, pos)
    bad = bad | (end < 0)
    # Jump table over positions 0..nbits, with nbits (the end) and nbits+1 (invalid) absorbing.
    jump = torch.empty(nbits + 2, dtype=torch.int64, device=dev)
    jump[:nbits] = torch.where(bad, nbits + 1, end)
    jump[nbits] = nbits + 1  # a code cannot start at the very end
    jump[nbits + 1] = nbits + 1
    on = torch.zeros(nbits + 2, dtype=torch.bool, device=dev)
    on[0] = True
    rounds = max(1, math.ceil(math.log2(count + 1)))
    for _ in range(rounds):
        on[jump[on]] = True
        jump = jump[jump]
    starts = torch.nonzero(on[:nbits]).view(-1)
    if starts.numel() < count:
        raise ValueError(f"Elias stream holds fewer than the {count} codes it declares")
    starts = starts[:count]
    if bool(bad[starts].any()):
        raise ValueError("Elias stream holds a malformed code")
    return val[starts], int(end[starts[-1]])


# --- the codec ------------------------------------------------------------------------------
class QSGD(LinearCodec):
    """QSGD stream. ``build("qsgd", bits=4, bucket_size=512, norm="max", coding="dense")``.

    Options: ``bits`` in (2, 4, 8); ``bucket_size`` in [8, 2**20], a multiple of 8 (of 16 at
    2 bits: a bucket fills whole 32-bit words); ``norm``
    "max" or "l2"; ``coding`` "dense" or "elias"; ``min_numel`` (tensors smaller than this are
    sent uncompressed, default 1024); ``wire_int16`` (allreduce mode: allow int16 sums; off by
    default because gloo cannot all-reduce int16, so sums beyond int8 travel as int32); ``backend``
    "auto", "compiled" or "eager" (see :mod:`.kernels`); ``seed``, ``rank``, ``stream`` for the
    random draws. A NaN or inf anywhere in the input raises :class:`NonFiniteInput` (it shows in
    its bucket's scale; raw tensors are checked as they are).
    """

    name = "qsgd"
    rejects_nonfinite = True

    def __init__(
        self,
        bits: int = 4,
        bucket_size: int = 512,
        norm: str = "max",
        coding: str = "dense",
        min_numel: int = 1024,
        backend: str = "auto",
        wire_int16: bool = False,
        *,
        seed: int = 0,
        rank: int = 0,
        stream: int = 0,
    ) -> None:
        super().__init__(seed=seed, rank=rank, stream=stream)
        if bits not in (2, 4, 8):
            raise ValueError(f"qsgd bits must be 2, 4 or 8, got {bits!r}")
        if check_int("qsgd bucket_size", bucket_size, 8, 1 << 20) % 8 or bucket_size * bits % 32:
            raise ValueError(
                f"qsgd bucket_size must be a multiple of 8, and of 16 at 2 bits (a bucket fills whole "
                f"32-bit words of {32 // bits} values), got {bucket_size!r} at {bits} bits"
            )
        check_choice("qsgd norm", norm, NORMS)
        check_choice("qsgd coding", coding, CODINGS)
        check_int("qsgd min_numel", min_numel, 0)
        check_choice("qsgd backend", backend, kernels.BACKENDS)
        self.bits = bits
        self.s = (1 << (bits - 1)) - 1
        self.bucket_size = bucket_size
        self.norm = norm
        self.coding = coding
        self.min_numel = min_numel
        self.fixed_size = coding == "dense"  # Elias codes are as long as the levels make them
        self.backend = backend
        self.wire_int16 = bool(wire_int16)

    def __repr__(self) -> str:
        return (
            f"QSGD(bits={self.bits}, bucket_size={self.bucket_size}, norm={self.norm!r}, "
            f"coding={self.coding!r}, seed={self.seed}, rank={self.rank}, stream={self.stream})"
        )

    # --- helpers --------------------------------------------------------------------------
    def _raw(self, g: torch.Tensor) -> bool:
        return g.numel() < max(self.min_numel, 1)

    def _meta(self, fmt: str, nnz: int = 0, nbits: int = 0) -> tuple[int, ...]:
        return (WIRE_FORMATS[fmt], self.bits, self.bucket_size, NORMS[self.norm], nnz, nbits)

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(whole buckets as an (nb, d) view, zero-padded last partial bucket (1, d), its offset)."""
        d = self.bucket_size
        n = flat.numel()
        nf = n - n % d
        main = flat[:nf].view(-1, d) if nf else None
        tail = None
        if n > nf:
            tail = torch.zeros(1, d, dtype=torch.float32, device=flat.device)
            tail[0, : n - nf] = flat[nf:]
        return main, tail, nf

    def _encode(self, flat: torch.Tensor, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        main, tail, nf = self._split(flat)
        static: dict[str, Any] = dict(bits=self.bits, d=self.bucket_size, norm=self.norm)
        out = []
        if main is not None:
            args = (main, kernels.split_key(key, 0, flat.device))
            out.append(kernels.run(kernels.qsgd_encode, args, static, self.backend, nf))
        if tail is not None:  # one bucket: eager, same arithmetic
            out.append(kernels.qsgd_encode(tail, kernels.split_key(key, nf, flat.device), **static))
        if len(out) == 1:
            return out[0]
        return torch.cat([out[0][0], out[1][0]]), torch.cat([out[0][1], out[1][1]])

    def _scales(self, flat: torch.Tensor) -> torch.Tensor:
        main, tail, _ = self._split(flat)
        parts = [kernels._norms(b.to(torch.float32), self.norm) for b in (main, tail) if b is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _finite(self, values: torch.Tensor, *, stepped: bool = True) -> None:
        """Raise NonFiniteInput unless every value is finite, leaving the step as before the call
        (``stepped``: the call has already advanced it)."""
        if not bool(torch.isfinite(values).all()):
            if stepped:
                self.step -= 1  # the call did not happen: the next one draws what this one would have
            raise NonFiniteInput("qsgd input holds non-finite values (NaN or inf)")

    # --- Compressor ---------------------------------------------------------------------
    def compress(self, g: torch.Tensor) -> Payload:
        flat = flat_input(self.name, g)
        shape, cid = tuple(g.shape), CODEC_IDS[self.name]
        if self._raw(flat):
            self.step += 1  # every call advances the step, whatever the format
            self._finite(flat)
            return Payload(cid, shape, g.dtype, self._meta("raw"), [flat.clone()])
        n, d = flat.numel(), self.bucket_size
        scale, packed = self._encode(flat, self.next_key())
        self._finite(scale)  # every value enters its bucket's scale (max or 2-norm)
        if self.coding == "dense":
            return Payload(cid, shape, g.dtype, self._meta("dense"), [scale, packed])
        # elias: levels from the same kernel (unpacked) so both codings draw identically
        q = kernels.qsgd_decode(torch.full_like(scale, self.s), packed, bits=self.bits, d=d, dtype=torch.float32)
        q = q[:n].to(torch.int64)
        nz = torch.nonzero(q).view(-1)
        gaps = torch.diff(nz, prepend=nz.new_full((1,), -1))
        lv = q[nz]
        gc, gl = omega_codes(gaps)
        lc, ll = omega_codes(lv.abs())
        signs = (lv < 0).to(torch.int64)
        data, nbits = write_bits(torch.cat([gc, lc, signs]), torch.cat([gl, ll, torch.ones_like(signs)]))
        return Payload(cid, shape, g.dtype, self._meta("elias", nz.numel(), nbits), [scale, data])

    def decompress(self, payload: Payload) -> torch.Tensor:
        validate(payload)
        fmt = payload.meta[0]
        n = payload.numel
        if fmt == WIRE_FORMATS["raw"]:
            return payload.parts[0].to(payload.dtype).reshape(payload.shape).clone()
        bits, d = payload.meta[1], payload.meta[2]
        scale, data = payload.parts
        s = (1 << (bits - 1)) - 1
        if fmt == WIRE_FORMATS["dense"]:
            static = dict(bits=bits, d=d, dtype=payload.dtype)
            out = kernels.run(kernels.qsgd_decode, (scale, data), static, self.backend, n)
            return out[:n].view(payload.shape)
        nnz, nbits = payload.meta[4], payload.meta[5]
        vals, used = omega_decode(data, nbits, 2 * nnz)
        if used + nnz != nbits:
            raise ValueError(f"qsgd elias stream: codes end at bit {used}, {nbits - used} bits left for {nnz} signs")
        gaps, lv = vals[:nnz], vals[nnz:]
        idx = torch.cumsum(gaps, 0) - 1
        if nnz and int(idx[-1]) >= n:
            raise ValueError(f"qsgd elias stream: position {int(idx[-1])} outside a tensor of {n} values")
        if nnz and int(lv.max()) > s:
            raise ValueError(f"qsgd elias stream: level {int(lv.max())} above s = {s}")
        sign = unpack_bits(data, nbits)[used:].to(torch.int64)
        q = torch.zeros(scale.numel() * d, dtype=torch.float32, device=data.device)
        q[idx] = (lv * (1 - 2 * sign)).to(torch.float32)
        out = (q.view(-1, d) * (scale / s)[:, None]).view(-1)[:n]
        return out.to(payload.dtype).reshape(payload.shape)

    def decompress_mean(self, payloads: Sequence[Payload], out: torch.Tensor | None = None) -> torch.Tensor:
        for p in payloads:
            validate(p)
        first = payloads[0] if payloads else None
        fused = (
            first is not None
            and len(payloads) > 1
            and first.meta[0] == WIRE_FORMATS["dense"]
            and all(p.meta == first.meta and p.shape == first.shape and p.dtype == first.dtype for p in payloads)
        )
        if not fused:
            return super().decompress_mean(payloads, out)
        assert first is not None
        bits, d = first.meta[1], first.meta[2]
        args = tuple(part for p in payloads for part in p.parts)
        static = dict(bits=bits, d=d, dtype=first.dtype)
        if out is None:
            mean = kernels.run(kernels.qsgd_decode_mean, args, static, self.backend, first.numel)
            return mean[: first.numel].view(first.shape)
        check_out(out, first)
        kernels.run(kernels.qsgd_decode_mean_into, (out.view(-1), *args), static, self.backend, first.numel)
        return out.view(first.shape)

    # --- LinearCodec (shared scale) --------------------------------------------------------
    def agreement(self, g: torch.Tensor, rank: int, world_size: int):
        flat = flat_input(self.name, g)
        if self._raw(flat):
            return None
        scale = self._scales(flat)
        self._finite(scale, stepped=False)  # the agreement draws nothing: the step is untouched
        return scale, "max"

    def encode_sum(self, g: torch.Tensor, agreed: torch.Tensor | None, world_size: int) -> torch.Tensor:
        flat = flat_input(self.name, g)
        if self._raw(flat):
            self.step += 1
            return flat.to(torch.float32, copy=True)
        if agreed is None:
            raise ValueError("qsgd encode_sum needs the agreed (all-reduced max) bucket scales")
        nb = -(-flat.numel() // self.bucket_size)
        if agreed.shape != (nb,) or agreed.dtype != torch.float32:
            raise ValueError(
                f"qsgd agreed scales must be float32 of shape ({nb},), got {tuple(agreed.shape)} {agreed.dtype}"
            )
        static: dict[str, Any] = dict(s=self.s, d=self.bucket_size, out=sum_dtype(world_size, self.s, self.wire_int16))
        key = self.next_key()
        main, tail, nf = self._split(flat)
        out = []
        if main is not None:
            args = (main, agreed[: main.shape[0]], kernels.split_key(key, 0, flat.device))
            out.append(kernels.run(kernels.qsgd_levels, args, static, self.backend, nf))
        if tail is not None:
            tail_key = kernels.split_key(key, nf, flat.device)
            out.append(kernels.qsgd_levels(tail, agreed[-1:], tail_key, **static)[: flat.numel() - nf])
        return out[0] if len(out) == 1 else torch.cat(out)

    def _unlevel(self, total: torch.Tensor, agreed: torch.Tensor | None, divide: int) -> torch.Tensor:
        if agreed is None:  # raw tensor: the wire is fp32 values
            return total.to(torch.float32) / divide
        # one multiply per value: eager torch is already a single pass
        d = self.bucket_size
        n = total.numel()
        nf = n - n % d
        f = agreed / (self.s * divide)
        out = torch.empty(n, dtype=torch.float32, device=total.device)
        if nf:
            torch.mul(total[:nf].view(-1, d), f[: nf // d, None], out=out[:nf].view(-1, d))
        if n > nf:
            torch.mul(total[nf:], f[-1], out=out[nf:])
        return out

    def decode_sum(self, total: torch.Tensor, agreed: torch.Tensor | None, world_size: int) -> torch.Tensor:
        """Mean of the ranks' quantized tensors, flat float32 (reshape with the caller's shape)."""
        return self._unlevel(total, agreed, world_size)

    def decode_local(self, wire: torch.Tensor, agreed: torch.Tensor | None, world_size: int) -> torch.Tensor:
        return self._unlevel(wire, agreed, 1)


def validate(p: Payload) -> None:
    """The fields of a QSGD payload (``decompress`` runs this before decoding)."""
    if len(p.meta) != 6:
        raise ValueError(f"qsgd payload needs 6 meta values, has {len(p.meta)}")
    fmt, bits, d, norm, nnz, nbits = p.meta
    n = p.numel
    if fmt == WIRE_FORMATS["raw"]:
        if p.dtype not in FLOATS:
            raise ValueError(f"qsgd raw payload dtype must be floating, is {p.dtype}")
        p.expect("qsgd", 6, [(p.dtype, n)])
        return
    if fmt not in WIRE_FORMATS.values():
        raise ValueError(f"qsgd payload wire format {fmt} unknown; known: {WIRE_FORMATS}")
    if bits not in (2, 4, 8) or d % 8 or d * bits % 32 or not 8 <= d <= 1 << 20 or norm not in NORMS.values():
        raise ValueError(f"qsgd payload parameters out of range: bits={bits}, bucket_size={d}, norm={norm}")
    if p.dtype not in FLOATS:
        raise ValueError(f"qsgd payload dtype must be floating, is {p.dtype}")
    nb = -(-n // d)
    if fmt == WIRE_FORMATS["dense"]:
        if nnz or nbits:
            raise ValueError("qsgd dense payload must have zero elias fields")
        p.expect("qsgd", 6, [(torch.float32, nb), (torch.int32, nb * d * bits // 32)])
    else:
        if not 0 <= nnz <= n or nbits < 3 * nnz or nbits > _OMEGA_MAX_BITS * 2 * nnz + nnz:
            raise ValueError(f"qsgd elias payload: {nnz} nonzeros in {nbits} bits is impossible for {n} values")
        p.expect("qsgd", 6, [(torch.float32, nb), (torch.uint8, (nbits + 7) // 8)])
    if nb:
        lo, hi = torch.aminmax(p.parts[0])  # one pass; a NaN makes both NaN, which fails both tests
        if not (0.0 <= float(lo) and float(hi) < math.inf):
            raise ValueError("qsgd payload scales must be finite and >= 0")
