"""AdaComp (Chen et al., 2018): adaptive residual gradient compression.

Per tensor the stream keeps a residue r (zero at first). At each step, with g the new gradient::

    G = r + g                 (everything owed so far)
    H = G + g                 (G pushed once more along the newest gradient)
    bins of L_T consecutive values; gmax_b = max_{i in b} |G_i|
    send i  iff  |H_i| >= gmax_b   (a bin whose G is all zero sends nothing)
    r = G - decoded(sent)

so a value is sent when the latest gradient would carry it past the largest value still owed in
its bin. By default the sent values are ternary, ``sign(G_i) * scale`` with one scale per tensor
(the mean |G_i| of the sent values); ``values="fp16"`` sends G_i in half precision instead.
Either way the residue keeps both what was not sent and the quantization error, so
``sum(decoded) + r == sum(g)`` over any number of steps.

``bin_size`` (L_T) defaults to 50 for conv-shaped tensors (3 or more dims) and 500 otherwise,
the values the paper reports for conv kernels and dense/LSTM weights.

Wire: one bit stream (plus an fp16 part with ``values="fp16"``) holding the positions and then
one sign bit per sent value. Positions are coded in whichever of these forms is smallest:

* ``offsets``: each sent value's offset inside its bin in ``ceil(log2 L_T)`` bits, followed by
  the bin boundaries as a unary count per bin (``c_b`` ones then a zero): ``nnz + nbins`` bits;
* ``bitmap``: one bit per value;
* ``rice`` (unless ``index_coding="design"``): the gaps between consecutive sent positions,
  Golomb-Rice coded with the best parameter k for this tensor: k low bits each, then
  ``gap >> k`` in unary. About ``log2(mean gap) + 1.5`` bits per sent value, so it wins
  whenever sent values are sparser than about one in eight.

With about 6 of 50 values sent per conv bin the offsets form costs about 8 bits per sent value,
i.e. about 35x fewer bytes than fp32; dense bins (about 6-10 of 500) give 150-250x. Real
gradients send more values in some steps (up to 15 of 500 in a small CNN's dense layer while
its loss falls fastest), where the Rice form keeps the dense ratio above 120x.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch

from . import kernels
from .base import FLOATS, Compressor, check_choice, check_int, flat_input
from .kernels import pack_bits, unpack_bits
from .payload import CODEC_IDS, Payload

INDEX_FORMATS = {"offsets": 0, "bitmap": 1, "rice": 2}
INDEX_CODINGS = ("auto", "design")
_MAX_RICE_K = 40
VALUE_FORMATS = {"ternary": 0, "fp16": 1}


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _bits_f32(i: int) -> float:
    return struct.unpack("<f", struct.pack("<i", i))[0]


def offset_width(L: int) -> int:
    return max(1, math.ceil(math.log2(L)))


def index_bits(fmt: int, n: int, L: int, nnz: int, aux: int = 0) -> int:
    """Bits the position code of ``nnz`` sent values takes in format ``fmt``.

    ``aux`` (rice only) packs the Rice parameter k (low 8 bits) and the unary total
    ``sum(gap >> k)`` (the rest).
    """
    if fmt == INDEX_FORMATS["bitmap"]:
        return n
    if fmt == INDEX_FORMATS["rice"]:
        return nnz * (aux & 0xFF) + (aux >> 8) + nnz
    return nnz * offset_width(L) + nnz + -(-n // L)


def stream_bits(fmt: int, vfmt: int, n: int, L: int, nnz: int, aux: int = 0) -> int:
    return index_bits(fmt, n, L, nnz, aux) + (nnz if vfmt == VALUE_FORMATS["ternary"] else 0)


def _unary(q: torch.Tensor) -> torch.Tensor:
    """q[i] ones then a zero, for every i, as one uint8 0/1 tensor."""
    out = torch.ones(int(q.sum()) + q.numel(), dtype=torch.uint8, device=q.device)
    out[torch.cumsum(q + 1, 0) - 1] = 0
    return out


def _read_unary(bits: torch.Tensor, count: int, what: str) -> torch.Tensor:
    """Inverse of :func:`_unary`; ``bits`` must hold exactly ``count`` terminated runs."""
    zeros = (bits == 0).nonzero().view(-1)
    if zeros.numel() != count or (count and int(zeros[-1]) != bits.numel() - 1):
        raise ValueError(f"adacomp {what}: {zeros.numel()} unary runs coded, {count} expected")
    return torch.diff(zeros, prepend=zeros.new_full((1,), -1)) - 1


def rice_parameter(v: torch.Tensor) -> tuple[int, int]:
    """Rice parameter for non-negative gaps v: (k, sum(v >> k)) minimising k*|v| + sum(v >> k).

    The cost is convex in k with its minimum near log2(mean gap); three candidates around it
    are scored exactly (instead of every k) to keep encoding one cheap pass over the gaps.
    """
    if v.numel() == 0:
        return 0, 0
    mean = float(v.sum()) / v.numel()
    guess = max(0, int(math.log2(mean * 0.69 + 1.0)))
    sums = {k: int((v >> k).sum()) for k in range(max(0, guess - 1), min(_MAX_RICE_K, guess + 1) + 1)}
    k = min(sums, key=lambda j: (j * v.numel() + sums[j], j))
    return k, sums[k]


def _read_fixed(bits: torch.Tensor, count: int, w: int) -> torch.Tensor:
    if w == 0:
        return torch.zeros(count, dtype=torch.int64, device=bits.device)
    sh = torch.arange(w - 1, -1, -1, device=bits.device)
    return (bits.view(count, w).to(torch.int64) << sh).sum(1)


def _fixed_width(values: torch.Tensor, w: int) -> torch.Tensor:
    """Each value's w low bits, MSB first, as a flat uint8 0/1 tensor (w <= 31: int32 math)."""
    dt = torch.int32 if w <= 31 else torch.int64
    sh = torch.arange(w - 1, -1, -1, dtype=dt, device=values.device)
    return ((values.to(dt)[:, None] >> sh) & 1).to(torch.uint8).view(-1)


class AdaComp(Compressor):
    """``build("adacomp", bin_size=None, values="ternary")``; one stream per tensor."""

    name = "adacomp"
    builtin_feedback = True

    def __init__(
        self,
        bin_size: int | None = None,
        values: str = "ternary",
        index_coding: str = "auto",
        *,
        seed: int = 0,
        rank: int = 0,
        stream: int = 0,
    ) -> None:
        super().__init__(seed=seed, rank=rank, stream=stream)
        if bin_size is not None:  # None: 50 for conv kernels, 500 otherwise
            check_int("adacomp bin_size", bin_size, 2, 1 << 16)
        check_choice("adacomp values", values, VALUE_FORMATS)
        check_choice("adacomp index_coding", index_coding, INDEX_CODINGS)
        self.bin_size = bin_size
        self.values = values
        self.index_coding = index_coding
        self.residue: torch.Tensor | None = None  # flat, zero padded to whole bins
        self._shape: tuple[int, ...] | None = None
        self._density = 0.0  # last step's sent fraction: picks how to scan the send mask

    def __repr__(self) -> str:
        return f"AdaComp(bin_size={self.bin_size}, values={self.values!r})"

    def _alloc(self, m: int, device: torch.device) -> torch.Tensor:
        """Zero buffers for m values (whole bins); returns the new residue."""
        self.residue = torch.zeros(m, dtype=torch.float32, device=device)
        self._G = torch.zeros(m, dtype=torch.float32, device=device)
        self._H = torch.zeros(m, dtype=torch.float32, device=device)
        self._mask = torch.zeros(m + (-m) % 8, dtype=torch.bool, device=device)
        return self.residue

    def bins_for(self, shape: tuple[int, ...]) -> int:
        if self.bin_size is not None:
            return self.bin_size
        return 50 if len(shape) >= 3 else 500

    def compress(self, g: torch.Tensor) -> Payload:
        flat = flat_input(self.name, g)
        shape = tuple(g.shape)
        n = flat.numel()
        L = self.bins_for(shape)
        nb = -(-n // L)
        r = self.residue
        if r is None:
            r = self._alloc(nb * L, flat.device)
            self._shape = shape
        elif self._shape != shape:
            raise ValueError(
                f"adacomp stream saw shape {self._shape} before and now {shape}; use one stream per tensor"
            )
        # All work happens in buffers the stream keeps (fresh large tensors cost page faults that
        # can exceed the arithmetic). Their tails past n stay zero, so no padding copies.
        G, H, mask = self._G, self._H, self._mask
        torch.add(r[:n], flat, out=G[:n])  # G = r + g
        Gb = G.view(nb, L)
        gmax = torch.maximum(Gb.amax(1), Gb.amin(1).neg_())
        # Every value enters its bin's max, so a NaN or inf anywhere shows here; the residue
        # buffer is untouched so far, so raising leaves the stream as it was.
        if not bool(torch.isfinite(gmax).all()):
            raise ValueError("adacomp: input holds non-finite values (NaN or inf); the residue was left unchanged")
        torch.add(G[:n], flat, out=H[:n])  # H = G + g
        H.abs_()
        # An all-zero bin (gmax 0) sends nothing: its threshold becomes +inf.
        thresh = torch.where(gmax > 0, gmax, torch.full_like(gmax, float("inf")))
        torch.ge(H.view(nb, L), thresh[:, None], out=mask[: nb * L].view(nb, L))
        # a flag in more than ~1 of 32 values fills most 8-flag words: scan flags directly then
        idx = kernels.mask_positions(mask, dense=self._density > 1 / 32)
        vals = G[idx]
        nnz = idx.numel()
        self._density = nnz / max(n, 1)
        neg = vals < 0
        if self.values == "ternary":
            scale = float(vals.abs().mean()) if nnz else 0.0
            sent = torch.where(neg, -scale, scale)
            value_part = None
        else:
            value_part = vals.clamp(-65504.0, 65504.0).to(torch.float16)  # the residue keeps any excess
            sent = value_part.to(torch.float32)
            scale = 0.0
        G[idx] = vals - sent  # the residue keeps what was not sent and the rounding of what was
        self.residue, self._G = G, r  # swap: G is the new residue, the old one becomes scratch
        self.step += 1

        # positions: the smallest of offsets + unary bin counts, a bitmap, Rice-coded gaps
        cost = {f: index_bits(f, n, L, nnz) for f in (INDEX_FORMATS["offsets"], INDEX_FORMATS["bitmap"])}
        aux = 0
        if self.index_coding == "auto":
            gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1
            k, qsum = rice_parameter(gaps)
            rice_aux = k | (qsum << 8)
            cost[INDEX_FORMATS["rice"]] = index_bits(INDEX_FORMATS["rice"], n, L, nnz, rice_aux)
        fmt = min(cost, key=lambda f: (cost[f], f))
        if fmt == INDEX_FORMATS["bitmap"]:
            pos_bits = mask[:n].view(torch.uint8)
        elif fmt == INDEX_FORMATS["offsets"]:
            counts = torch.bincount(idx // L, minlength=nb)
            pos_bits = torch.cat([_fixed_width(idx % L, offset_width(L)), _unary(counts)])
        else:
            aux = rice_aux
            pos_bits = torch.cat([_fixed_width(gaps & ((1 << k) - 1), k), _unary(gaps >> k)])
        pieces = [pos_bits]
        if value_part is None:
            pieces.append(neg.to(torch.uint8))
        data = pack_bits(torch.cat(pieces))
        vfmt = VALUE_FORMATS[self.values]
        meta = (fmt, vfmt, L, nnz, _f32_bits(scale), aux)
        parts = [data] if value_part is None else [data, value_part]
        return Payload(CODEC_IDS[self.name], shape, g.dtype, meta, parts)

    def decompress(self, payload: Payload) -> torch.Tensor:
        validate(payload)
        fmt, vfmt, L, nnz, sbits, aux = payload.meta
        n = payload.numel
        data = payload.parts[0]
        nb = -(-n // L)
        bits = unpack_bits(data, stream_bits(fmt, vfmt, n, L, nnz, aux))
        ib = index_bits(fmt, n, L, nnz, aux)
        if fmt == INDEX_FORMATS["bitmap"]:
            pos = bits[:n].nonzero().view(-1)
            if pos.numel() != nnz:
                raise ValueError(f"adacomp bitmap marks {pos.numel()} values, the header says {nnz}")
        elif fmt == INDEX_FORMATS["offsets"]:
            w = offset_width(L)
            off = _read_fixed(bits[: nnz * w], nnz, w)
            counts = _read_unary(bits[nnz * w : ib], nb, "bin marks")
            bin_of = torch.repeat_interleave(torch.arange(nb, device=data.device), counts)
            if bin_of.numel() != nnz:
                raise ValueError(f"adacomp bin marks count {bin_of.numel()} values, the header says {nnz}")
            pos = bin_of * L + off
            if nnz and (int(off.max()) >= L or int(pos.max()) >= n or not bool((torch.diff(pos) > 0).all())):
                raise ValueError("adacomp offsets out of their bins or not increasing")
        else:
            k = aux & 0xFF
            rem = _read_fixed(bits[: nnz * k], nnz, k)
            q = _read_unary(bits[nnz * k : ib], nnz, "rice gaps")
            pos = torch.cumsum((q << k) + rem + 1, 0) - 1
            if nnz and int(pos[-1]) >= n:
                raise ValueError(f"adacomp rice gaps reach position {int(pos[-1])} of {n}")
        out = torch.zeros(n, dtype=torch.float32, device=data.device)
        if vfmt == VALUE_FORMATS["ternary"]:
            scale = _bits_f32(sbits)
            neg = bits[ib:].bool()
            out[pos] = torch.where(neg, -scale, scale)
        else:
            out[pos] = payload.parts[1].to(torch.float32)
        return out.to(payload.dtype).reshape(payload.shape)

    def state_dict(self) -> dict[str, Any]:
        if self.residue is None or self._shape is None:
            return {"step": self.step, "residue": None}
        n = math.prod(self._shape)
        return {"step": self.step, "residue": self.residue[:n].reshape(self._shape).clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        r = state["residue"]
        if r is None:
            self.residue, self._shape = None, None
            return
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            raise ValueError("adacomp state: residue must be a floating tensor or None")
        self._shape = tuple(r.shape)
        L = self.bins_for(self._shape)
        n = r.numel()
        self._alloc(-(-n // L) * L, r.device)[:n] = r.reshape(-1)


def validate(p: Payload) -> None:
    """The fields of an AdaComp payload (``decompress`` runs this before decoding)."""
    if len(p.meta) != 6:
        raise ValueError(f"adacomp payload needs 6 meta values, has {len(p.meta)}")
    fmt, vfmt, L, nnz, sbits, aux = p.meta
    n = p.numel
    if fmt not in INDEX_FORMATS.values() or vfmt not in VALUE_FORMATS.values():
        raise ValueError(f"adacomp payload formats unknown: index {fmt}, values {vfmt}")
    if not 2 <= L <= 1 << 16 or not 0 <= nnz <= n or p.dtype not in FLOATS:
        raise ValueError(f"adacomp payload fields out of range: bin_size={L}, nnz={nnz}, n={n}, dtype={p.dtype}")
    if fmt == INDEX_FORMATS["rice"]:
        # gaps sum to at most n, so the unary part sum(gap >> k) cannot exceed n >> k
        if aux < 0 or (aux & 0xFF) > _MAX_RICE_K or (aux >> 8) > (n >> (aux & 0xFF)):
            raise ValueError(f"adacomp rice fields impossible for {n} values: k={aux & 0xFF}, unary={aux >> 8}")
    elif aux != 0:
        raise ValueError("adacomp payload: the aux field is only used by the rice index format")
    nbytes = -(-stream_bits(fmt, vfmt, n, L, nnz, aux) // 8)
    if vfmt == VALUE_FORMATS["ternary"]:
        p.expect("adacomp", 6, [(torch.uint8, nbytes)])
        if not -(2**31) <= sbits < 2**31:
            raise ValueError("adacomp payload scale field is not a float32")
        scale = _bits_f32(sbits)
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"adacomp payload scale {scale} must be finite and >= 0")
    else:
        p.expect("adacomp", 6, [(torch.uint8, nbytes), (torch.float16, nnz)])
        if not bool(torch.isfinite(p.parts[1]).all()):
            raise ValueError("adacomp payload values must be finite")
