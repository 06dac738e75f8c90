"""Fusing many tensors into a few buckets, so that a model's hundreds of parameters cost a few
collectives instead of hundreds (the idea of DDP's gradient buckets, default 25 MB too).

Tensors are grouped by (dtype, device), keeping the caller's order within a group (so callers
that know their backward order can put early-ready tensors first), and cut into consecutive
buckets of at most ``bucket_bytes`` bytes of input; a tensor larger than that is a bucket on its
own. Each entry knows its offset in the bucket's flat vector, which the modes that flatten
(``allreduce``, ``two_phase``) use. A bucket's ``key`` is a stable hash of its tensors' names
and shapes: streams that belong to a bucket rather than to one tensor are named after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .agreement import word


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


def plan(specs: Sequence[tuple[str, tuple[int, ...], torch.dtype, torch.device]], bucket_bytes: int) -> list[Bucket]:
    """Cut ``specs`` (name, shape, dtype, device), all with at least one value, into buckets."""
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
            if current and used + nbytes > bucket_bytes:
                buckets.append(_bucket(len(buckets), current, dtype, device))
                current, used = [], 0
            current.append(item)
            used += nbytes
        if current:
            buckets.append(_bucket(len(buckets), current, dtype, device))
    return buckets


def _bucket(index: int, items: list[tuple[str, tuple[int, ...], int]], dtype: torch.dtype,
            device: torch.device) -> Bucket:
    entries, off = [], 0
    for name, shape, numel in items:
        entries.append(Entry(name, shape, numel, off))
        off += numel
    key = format(word("bucket:" + "\0".join(f"{n}{s}" for n, s, _ in items) + f":{dtype}"), "016x")
    return Bucket(index, tuple(entries), dtype, device, off, key)
