"""The wire format of one compressed tensor.

A :class:`Payload` is what a compressor produces and what travels: a small self-describing
header and a few raw tensors ("parts"). It knows nothing of processes; ``to_bytes`` makes the
single flat ``uint8`` tensor that a collective moves, ``from_bytes`` reads one back and refuses,
with a ``ValueError`` naming the problem, anything that is not exactly a well-formed payload.
``from_bytes`` checks the structure (header, known codec id, part sizes); the codec's
``decompress`` checks its own fields (meta and parts, through :meth:`Payload.expect`) before it
decodes anything. This module is the bottom layer: the codecs import it, never the reverse.

Layout (little-endian, every field 8-byte aligned so parts can be viewed without a copy)::

    offset 0   magic  b"DSUP"                       4 bytes
           4   version (uint8) = 1
           5   codec id (uint8)                      see ``CODEC_IDS``
           6   original dtype code (uint8)
           7   ndim (uint8, <= 8)
           8   number of meta integers (uint8, <= 16)
           9   number of parts (uint8, <= 8)
          10   reserved, zero (6 bytes)
          16   shape:  ndim   x int64
               meta:   nmeta  x int64                codec parameters (bits, bucket size, ...)
               parts:  nparts x (dtype code int64, numel int64)
               data of each part, each padded to a multiple of 8 bytes

``nbytes`` is the exact length of that buffer: what a collective sends for this tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAGIC = b"DSUP"
VERSION = 1
HEADER_BYTES = 16
MAX_NDIM = 8
MAX_META = 16
MAX_PARTS = 8
# No single tensor we encode has more values than this; a header claiming more is lying.
MAX_NUMEL = 1 << 40

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.uint8: 4,
    torch.int8: 5,
    torch.int16: 6,
    torch.int32: 7,
    torch.int64: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# Wire ids are part of the payload format: never renumber, only append.
CODEC_IDS: dict[str, int] = {
    "identity": 0,
    "fp16": 1,
    "bf16": 2,
    "qsgd": 3,
    "adacomp": 4,
    "topk": 5,
    "randomk": 6,
    "cltk": 7,
}
CODEC_NAMES = {cid: name for name, cid in CODEC_IDS.items()}


def codec_name_of(codec_id: int) -> str:
    """The codec name of a wire id; ``ValueError`` for an unknown one."""
    try:
        return CODEC_NAMES[codec_id]
    except KeyError:
        raise ValueError(f"payload codec id {codec_id} is unknown; known: {sorted(CODEC_NAMES)}") from None


def _pad8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Payload:
    """One encoded tensor: codec id, original shape and dtype, integer meta and raw parts."""

    codec: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: tuple[int, ...] = ()
    parts: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _header_len(self) -> int:
        return HEADER_BYTES + 8 * (len(self.shape) + len(self.meta) + 2 * len(self.parts))

    @property
    def nbytes(self) -> int:
        """Exact number of bytes that travel for this payload (header included)."""
        return self._header_len() + sum(_pad8(p.numel() * p.element_size()) for p in self.parts)

    def _header(self) -> torch.Tensor:
        head = bytearray(MAGIC)
        head += bytes(
            [
                VERSION,
                self.codec,
                DTYPE_CODES[self.dtype],
                len(self.shape),
                len(self.meta),
                len(self.parts),
                0,
                0,
                0,
                0,
                0,
                0,
            ]
        )
        ints = [*self.shape, *self.meta]
        for p in self.parts:
            ints += [DTYPE_CODES[p.dtype], p.numel()]
        body = torch.tensor(ints, dtype=torch.int64).view(torch.uint8)
        return torch.cat([torch.frombuffer(head, dtype=torch.uint8), body])

    def write_into(self, out: torch.Tensor) -> None:
        """Serialise into ``out``, a contiguous CPU uint8 tensor of exactly ``nbytes``."""
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != self.nbytes:
            raise ValueError(
                f"write_into needs a 1-D uint8 tensor of {self.nbytes} bytes, got {tuple(out.shape)} {out.dtype}"
            )
        head = self._header()
        out[: head.numel()].copy_(head)
        off = head.numel()
        for p in self.parts:
            raw = p.detach().contiguous().reshape(-1).view(torch.uint8)
            out[off : off + raw.numel()].copy_(raw)
            end = off + _pad8(raw.numel())
            out[off + raw.numel() : end].zero_()
            off = end

    def to_bytes(self) -> torch.Tensor:
        """One flat uint8 CPU tensor of exactly ``nbytes``."""
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        self.write_into(out)
        return out

    @classmethod
    def from_bytes(cls, buf: torch.Tensor | bytes | bytearray | memoryview) -> Payload:
        """Read a payload back; raise ``ValueError`` on any structural fault.

        The parts of the returned payload are views into ``buf`` when it is 8-byte aligned,
        copies otherwise. Whether the fields make sense for the codec is the codec's check:
        its ``decompress`` refuses, with ``ValueError``, a payload it cannot decode to a
        tensor of the declared shape, before decoding anything.
        """
        if not isinstance(buf, torch.Tensor):
            buf = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError(f"payload must be a 1-D uint8 tensor, got {tuple(buf.shape)} {buf.dtype}")
        buf = buf.detach().cpu()
        if not buf.is_contiguous() or buf.storage_offset() % 8:
            buf = buf.clone()
        n = buf.numel()
        if n < HEADER_BYTES:
            raise ValueError(f"payload truncated: {n} bytes, a header alone needs {HEADER_BYTES}")
        head = bytes(buf[:HEADER_BYTES].tolist())
        if head[:4] != MAGIC:
            raise ValueError(f"not a dist_soup payload: magic {head[:4]!r}, expected {MAGIC!r}")
        version, codec, dcode, ndim, nmeta, nparts = head[4:10]
        if version != VERSION:
            raise ValueError(f"payload version {version} is not supported (this build reads {VERSION})")
        if any(head[10:16]):
            raise ValueError("payload header has non-zero reserved bytes")
        codec_name_of(codec)  # raises ValueError for an unknown id
        if dcode not in CODE_DTYPES:
            raise ValueError(f"payload dtype code {dcode} unknown; known: {sorted(CODE_DTYPES)}")
        if ndim > MAX_NDIM or nmeta > MAX_META or nparts > MAX_PARTS:
            raise ValueError(
                f"payload header out of range: ndim={ndim} (max {MAX_NDIM}), "
                f"meta={nmeta} (max {MAX_META}), parts={nparts} (max {MAX_PARTS})"
            )
        nints = ndim + nmeta + 2 * nparts
        hlen = HEADER_BYTES + 8 * nints
        if n < hlen:
            raise ValueError(f"payload truncated: {n} bytes, its header declares {hlen}")
        ints = buf[HEADER_BYTES:hlen].view(torch.int64).tolist()
        shape = tuple(ints[:ndim])
        meta = tuple(ints[ndim : ndim + nmeta])
        if any(s < 0 for s in shape) or math.prod(shape) > MAX_NUMEL:
            raise ValueError(f"payload shape {shape} is invalid")
        off = hlen
        parts = []
        for i in range(nparts):
            pcode, pnumel = ints[ndim + nmeta + 2 * i : ndim + nmeta + 2 * i + 2]
            if pcode not in CODE_DTYPES:
                raise ValueError(f"payload part {i} has unknown dtype code {pcode}")
            pdtype = CODE_DTYPES[pcode]
            if not 0 <= pnumel <= MAX_NUMEL:
                raise ValueError(f"payload part {i} declares {pnumel} values")
            size = pnumel * torch.empty(0, dtype=pdtype).element_size()
            if off + _pad8(size) > n:
                raise ValueError(f"payload truncated: part {i} needs bytes {off}..{off + _pad8(size)}, buffer has {n}")
            parts.append(buf[off : off + size].view(pdtype))
            off += _pad8(size)
        if off != n:
            raise ValueError(f"payload length mismatch: header and parts account for {off} bytes, buffer has {n}")
        return cls(codec, shape, CODE_DTYPES[dcode], meta, parts)

    def expect(self, name: str, n_meta: int, part_specs: Sequence[tuple[torch.dtype, int | None]]) -> None:
        """Codec-side check: codec id, meta count and each part's dtype and (if given) numel.

        Raises ``ValueError`` naming the codec and the first field that does not fit.
        """
        if self.codec != CODEC_IDS[name]:
            raise ValueError(f"a {name} stream cannot decode a payload of codec {codec_name_of(self.codec)}")
        if len(self.meta) != n_meta:
            raise ValueError(f"{name} payload needs {n_meta} meta values, has {len(self.meta)}")
        if len(self.parts) != len(part_specs):
            raise ValueError(f"{name} payload needs {len(part_specs)} parts, has {len(self.parts)}")
        for i, (part, (dtype, numel)) in enumerate(zip(self.parts, part_specs)):
            if part.dtype != dtype:
                raise ValueError(f"{name} payload part {i} must be {dtype}, is {part.dtype}")
            if numel is not None and part.numel() != numel:
                raise ValueError(f"{name} payload part {i} must hold {numel} values, holds {part.numel()}")
