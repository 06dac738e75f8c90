"""Fusing many tensors into a few buckets, so that a model's hundreds of parameters cost a few
collectives instead of hundreds (the idea of DDP's gradient buckets, default 25 MB too).

Tensors are grouped by (dtype, device), keeping the caller's order within a group (so callers
that know their backward order can put early-ready tensors first), and cut into consecutive
buckets of at most ``bucket_bytes`` bytes of input; a tensor larger than that is a bucket on its
own. Each entry knows its offset in the bucket's flat vector, which the modes that flatten
(``allreduce``, ``two_phase``) use. A bucket's ``key`` is a stable hash of its tensors' names
and shapes: streams that belong to a bucket rather than to one tensor are named after it.

Pieces: a tensor of more than ``chunk_bytes`` is cut (:func:`pieces`) into ``k`` near-equal
consecutive pieces of its flat vector, ``k = ceil(bytes / chunk_bytes)``, named
``f"{name}#{j}"``; each piece is a stream and a bucket of its own (``plan(..., solo=...)``), so
the exchange encodes piece j+1 while piece j is on the wire and decodes piece j while j+1 is.
The cut depends only on the size, so it is the same on every rank and in every call.
:meth:`Piece.of` is both directions: the piece's input is its slice of the tensor, and its mean
is written into its slice of the result, which so is assembled as the pieces arrive.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .agreement import word


def megabytes(name: str, value: object, *, zero: str | None = None) -> float:
    """``value`` as a positive finite number of megabytes, or ValueError naming ``name``;
    ``zero`` (what 0 means) lets 0 through too."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if value > 0 or (value == 0 and zero is not None):
            return float(value)
    allowed = f"0 ({zero}) or a positive" if zero else "a positive"
    raise ValueError(f"{name} must be {allowed} finite number of megabytes, got {value!r}")


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    numel: int
    offset: int  # in the bucket's flat vector


@dataclass(frozen=True)
class Bucket:
    index: int
    entries: tuple[Entry, ...]
    dtype: torch.dtype
    device: torch.device
    numel: int
    key: str

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """(offset, length) of ``parts`` near-equal consecutive chunks (the first ``numel % parts``
    one longer), like ``torch.tensor_split``."""
    base, extra = divmod(numel, parts)
    out, off = [], 0
    for j in range(parts):
        n = base + (1 if j < extra else 0)
        out.append((off, n))
        off += n
    return out


class Piece(NamedTuple):
    """Values ``[offset, offset + numel)`` of a tensor's flat vector, the stream ``name``."""

    name: str
    offset: int
    numel: int

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of a contiguous ``tensor``: a view, so writing it writes the tensor."""
        return tensor.view(-1)[self.offset : self.offset + self.numel]


def pieces(name: str, numel: int, element_size: int, chunk_bytes: int | None) -> list[Piece]:
    """The pieces of a tensor cut into pieces of at most about ``chunk_bytes`` (none when it fits
    in one, or ``chunk_bytes`` is None)."""
    if not chunk_bytes or numel * element_size <= chunk_bytes:
        return []
    k = -(-numel * element_size // chunk_bytes)
    return [Piece(f"{name}#{j}", off, n) for j, (off, n) in enumerate(chunk_bounds(numel, min(k, numel)))]


def plan(
    specs: Sequence[tuple[str, tuple[int, ...], torch.dtype, torch.device]],
    bucket_bytes: int,
    solo: Collection[str] = (),
) -> list[Bucket]:
    """Cut ``specs`` (name, shape, dtype, device), all with at least one value, into buckets;
    the tensors named in ``solo`` (pieces) get a bucket each."""
    groups: dict[tuple[torch.dtype, torch.device], list[tuple[str, tuple[int, ...], int]]] = {}
    for name, shape, dtype, device in specs:
        numel = 1
        for s in shape:
            numel *= int(s)
        groups.setdefault((dtype, torch.device(device)), []).append((name, tuple(shape), numel))
    buckets: list[Bucket] = []
    for (dtype, device), items in groups.items():
        size = torch.empty(0, dtype=dtype).element_size()
        current: list[tuple[str, tuple[int, ...], int]] = []
        used = 0
        for item in items:
            nbytes = item[2] * size
            alone = item[0] in solo
            if current and (alone or used + nbytes > bucket_bytes):
                buckets.append(_bucket(len(buckets), current, dtype, device))
                current, used = [], 0
            current.append(item)
            used += nbytes
            if alone:
                buckets.append(_bucket(len(buckets), current, dtype, device))
                current, used = [], 0
        if current:
            buckets.append(_bucket(len(buckets), current, dtype, device))
    return buckets


def _bucket(
    index: int, items: list[tuple[str, tuple[int, ...], int]], dtype: torch.dtype, device: torch.device
) -> Bucket:
    entries, off = [], 0
    for name, shape, numel in items:
        entries.append(Entry(name, shape, numel, off))
        off += numel
    key = format(word("bucket:" + "\0".join(f"{n}{s}" for n, s, _ in items) + f":{dtype}"), "016x")
    return Bucket(index, tuple(entries), dtype, device, off, key)
