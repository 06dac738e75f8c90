"""Sparsifiers: ``topk`` (with error feedback), ``randomk`` (shared seed) and ScaleCom's ``cltk``.

Each keeps k of the n values of a tensor, ``k = k`` if given, else ``max(1, round(ratio * n))``.

* **topk** sends the k largest ``|x|`` as (index, value) pairs. Biased, so by default it keeps an
  error-feedback residue: ``x = g + r``, send top-k of x, ``r = x - sent``
  (``feedback=False`` drops it; then ``error_feedback=True`` can wrap it instead).
* **randomk** sends the values at k positions drawn from a key that all ranks share: it mixes
  ``(seed, stream, step)`` but not the rank, so every rank picks the same positions at the
  same step and the payload carries only the values (and the key). Linear: the values of P
  ranks are summed directly. ``rescale=True`` multiplies by n/k, making it unbiased.
* **cltk** (ScaleCom, Chen et al. 2020, cyclic local top-k): at step t the leader ``t mod P``
  takes the top-k indices of its own ``|m + g|`` and every rank sends its values there; the
  collective averages them. Each rank keeps a low-pass-filtered memory::

      p = m + g,      m <- (1 - beta) m + beta (p - CLT_k(p))

  where ``CLT_k(p)`` is p restricted to the leader's indices. ``beta = 1`` is plain error
  feedback; smaller beta smooths the memory across steps (default 0.1).

The step counters must advance identically on every rank (one call per step): randomk's
positions and cltk's leader come from them.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import FLOATS, Compressor, LinearCodec, check_fraction, check_int, flat_input, mix_key
from .feedback import Residue
from .payload import CODEC_IDS, Payload


def index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n <= 2**31 - 1 else torch.int64


def _resolve_k(n: int, ratio: float | None, k: int | None) -> int:
    if k is not None:
        return max(0, min(int(k), n))
    assert ratio is not None  # the constructor checked one of them
    return min(n, max(1, round(ratio * n))) if n else 0


def _scatter(n: int, idx: torch.Tensor, vals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(n, dtype=dtype, device=vals.device)
    out[idx.to(torch.int64)] = vals.to(dtype)
    return out


def _check_pairs(name: str, p: Payload) -> None:
    """Payload with (indices, values): indices unique, in range, as many as values."""
    if len(p.parts) != 2:
        raise ValueError(f"{name} payload needs 2 parts, has {len(p.parts)}")
    n = p.numel
    p.expect(name, 0, [(index_dtype(n), None), (p.dtype, p.parts[0].numel())])
    if p.dtype not in FLOATS:
        raise ValueError(f"{name} payload dtype must be floating, is {p.dtype}")
    idx = p.parts[0]
    if idx.numel() > n:
        raise ValueError(f"{name} payload holds {idx.numel()} indices for {n} values")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} payload index out of range [0, {n}): {lo if lo < 0 else hi}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{name} payload repeats an index")


class _Sparse(Compressor):
    def __init__(
        self, ratio: float | None = 0.01, k: int | None = None, *, seed: int = 0, rank: int = 0, stream: int = 0
    ):
        super().__init__(seed=seed, rank=rank, stream=stream)
        if k is not None:
            check_int(f"{self.name} k", k, 1)
        else:
            check_fraction(f"{self.name} ratio", ratio)
        self.ratio = ratio
        self.k = k

    def _k(self, n: int) -> int:
        return _resolve_k(n, self.ratio, self.k)

    def _pairs(self, shape, dtype, idx, vals) -> Payload:
        n = 1
        for s in shape:
            n *= s
        return Payload(CODEC_IDS[self.name], tuple(shape), dtype, (), [idx.to(index_dtype(n)), vals.to(dtype)])

    def decompress(self, payload: Payload) -> torch.Tensor:
        _check_pairs(self.name, payload)
        idx, vals = payload.parts
        return _scatter(payload.numel, idx, vals, payload.dtype).reshape(payload.shape)


class TopK(_Sparse):
    """``build("topk", ratio=0.01)`` or ``k=...``; ``feedback`` (default True) keeps the residue."""

    name = "topk"
    fixed_size = True  # k values and k positions of a width set by the tensor's size

    def __init__(
        self,
        ratio: float | None = 0.01,
        k: int | None = None,
        feedback: bool = True,
        *,
        seed: int = 0,
        rank: int = 0,
        stream: int = 0,
    ):
        super().__init__(ratio, k, seed=seed, rank=rank, stream=stream)
        self.builtin_feedback = bool(feedback)
        self.memory = Residue(self.name) if feedback else None

    @property
    def residue(self) -> torch.Tensor | None:
        """The flat residue (None before the first call, or with ``feedback=False``)."""
        return None if self.memory is None else self.memory.tensor

    def compress(self, g: torch.Tensor) -> Payload:
        x = flat_input(self.name, g)
        if self.memory is not None:
            x = self.memory.compensate(x)
        idx = torch.topk(x.abs(), self._k(x.numel()), sorted=False).indices
        vals = x[idx].to(g.dtype)
        self.step += 1
        if self.memory is not None:  # what was sent leaves the residue, its cast error stays
            self.memory.update(x, _scatter(x.numel(), idx, vals, x.dtype))
        return self._pairs(g.shape, g.dtype, idx, vals)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "residue": None if self.memory is None else self.memory.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.memory is not None:
            self.memory.load(state.get("residue"))


class RandomK(_Sparse, LinearCodec):
    """``build("randomk", ratio=0.01, seed=s)``: k values at positions shared by all ranks."""

    name = "randomk"
    fixed_size = True

    def __init__(
        self,
        ratio: float | None = 0.01,
        k: int | None = None,
        rescale: bool = False,
        *,
        seed: int = 0,
        rank: int = 0,
        stream: int = 0,
    ):
        super().__init__(ratio, k, seed=seed, rank=rank, stream=stream)
        self.rescale = bool(rescale)
        self._last: tuple[int, torch.Tensor, float] | None = None

    def shared_key(self) -> int:
        """This step's key: (seed, stream, step), deliberately not the rank. Advances the step."""
        key = mix_key(self.seed, self.stream, self.step, 0x52414E44)
        self.step += 1
        return key

    @staticmethod
    def positions(key: int, n: int, k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """k distinct positions in [0, n), a uniformly random subset drawn from ``key``, sorted.

        For k well below n: the first k distinct values of a stream of iid uniform draws (which
        is exactly a uniform k-subset), found for all draws at once with a stable sort; this is
        O(k log k) where ``randperm`` costs O(n). For k above n/4, ``randperm``.
        """
        gen = torch.Generator().manual_seed(key)
        if 4 * k > n:
            return torch.randperm(n, generator=gen)[:k].sort().values.to(device)
        draws = torch.empty(0, dtype=torch.int64)
        m = k + (k * k) // max(n, 1) + 16  # about the duplicates to expect, plus slack
        while True:
            draws = torch.cat([draws, torch.randint(0, n, (m,), generator=gen)])
            vals, order = torch.sort(draws, stable=True)
            first = torch.ones_like(vals, dtype=torch.bool)
            first[1:] = vals[1:] != vals[:-1]
            firsts = order[first]  # draw index of each value's first occurrence
            if firsts.numel() >= k:
                return draws[firsts.sort().values[:k]].sort().values.to(device)
            m = 2 * (k - firsts.numel()) + 16

    def _gain(self, n: int, k: int) -> float:
        return n / k if self.rescale and k else 1.0

    def compress(self, g: torch.Tensor) -> Payload:
        flat = flat_input(self.name, g)
        n = flat.numel()
        k = self._k(n)
        key = self.shared_key()
        vals = flat[self.positions(key, n, k, flat.device)].to(g.dtype)
        return Payload(CODEC_IDS[self.name], tuple(g.shape), g.dtype, (key, k, int(self.rescale)), [vals])

    def decompress(self, payload: Payload) -> torch.Tensor:
        _check_randomk(payload)
        key, k, rescale = payload.meta
        n = payload.numel
        vals = payload.parts[0]
        idx = self.positions(key, n, k, vals.device)
        gain = n / k if rescale and k else 1.0
        out = _scatter(n, idx, vals, torch.float32 if payload.dtype != torch.float64 else torch.float64)
        if gain != 1.0:
            out *= gain
        return out.to(payload.dtype).reshape(payload.shape)

    # LinearCodec: positions agreed through the shared key, no agreement round needed
    def encode_sum(self, g, agreed, world_size):
        flat = flat_input(self.name, g)
        n = flat.numel()
        k = self._k(n)
        idx = self.positions(self.shared_key(), n, k, flat.device)
        self._last = (n, idx, self._gain(n, k))
        return flat[idx].to(torch.float32)

    def _decode(self, wire: torch.Tensor, divide: int) -> torch.Tensor:
        if self._last is None:
            raise ValueError("randomk decode_sum/decode_local must follow encode_sum on the same stream")
        n, idx, gain = self._last
        if wire.numel() != idx.numel():
            raise ValueError(f"randomk wire holds {wire.numel()} values, this step sent {idx.numel()}")
        return _scatter(n, idx, wire.to(torch.float32) * (gain / divide), torch.float32)

    def decode_sum(self, total, agreed, world_size):
        return self._decode(total, world_size)

    def decode_local(self, wire, agreed, world_size):
        return self._decode(wire, 1)


def _check_randomk(p: Payload) -> None:
    p.expect("randomk", 3, [(p.dtype, None)])
    key, k, rescale = p.meta
    if p.dtype not in FLOATS:
        raise ValueError(f"randomk payload dtype must be floating, is {p.dtype}")
    if not 0 <= key < 2**63 or rescale not in (0, 1) or not 0 <= k <= p.numel or p.parts[0].numel() != k:
        raise ValueError(f"randomk payload fields inconsistent: key={key}, k={k}, rescale={rescale}, n={p.numel}")


class CLTK(_Sparse, LinearCodec):
    """ScaleCom cyclic local top-k: ``build("cltk", ratio=0.01, beta=0.1)``."""

    name = "cltk"
    builtin_feedback = True

    def __init__(
        self,
        ratio: float | None = 0.01,
        k: int | None = None,
        beta: float = 0.1,
        *,
        seed: int = 0,
        rank: int = 0,
        stream: int = 0,
    ):
        super().__init__(ratio, k, seed=seed, rank=rank, stream=stream)
        self.beta = check_fraction("cltk beta", beta)
        self._memory = Residue(self.name)
        self._n: int | None = None

    @property
    def memory(self) -> torch.Tensor | None:
        """The flat low-pass memory m (None before the first call)."""
        return self._memory.tensor

    def leader(self, world_size: int) -> int:
        """The rank whose top-k indices everyone uses at this step: ``step mod P``."""
        return self.step % world_size

    def _p(self, g: torch.Tensor) -> torch.Tensor:
        return self._memory.compensate(flat_input(self.name, g))

    def _remember(self, p: torch.Tensor, idx: torch.Tensor) -> None:
        idx = idx.to(torch.int64)
        self._memory.update(p, _scatter(p.numel(), idx, p[idx], p.dtype), self.beta)  # p - CLT_k(p)
        self.step += 1

    def _topk(self, p: torch.Tensor) -> torch.Tensor:
        k = self._k(p.numel())
        return torch.topk(p.abs(), k, sorted=False).indices.sort().values.to(index_dtype(p.numel()))

    # single-stream use (mode "allgather"): this rank is its own leader
    def compress(self, g: torch.Tensor) -> Payload:
        p = self._p(g)
        idx = self._topk(p)
        vals = p[idx.to(torch.int64)]
        self._remember(p, idx)
        return self._pairs(g.shape, g.dtype, idx, vals)

    def agreement(self, g, rank, world_size):
        p = self._p(g)
        n = p.numel()
        if rank == self.leader(world_size):
            idx = self._topk(p)
        else:
            idx = torch.zeros(self._k(n), dtype=index_dtype(n), device=p.device)
        return idx, "leader"

    def encode_sum(self, g, agreed, world_size):
        p = self._p(g)
        n = p.numel()
        if agreed is None or agreed.dtype != index_dtype(n) or agreed.numel() != self._k(n):
            raise ValueError(f"cltk needs the leader's {self._k(n)} {index_dtype(n)} indices as agreement")
        idx = agreed.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError("cltk agreed indices out of range")
        wire = p[idx]
        self._n = n
        self._remember(p, idx)
        return wire

    def _decode(self, wire, agreed, divide):
        if self._n is None or agreed is None:
            raise ValueError("cltk decode_sum/decode_local must follow encode_sum with the same agreement")
        return _scatter(self._n, agreed, wire.to(torch.float32) / divide, torch.float32)

    def decode_sum(self, total, agreed, world_size):
        return self._decode(total, agreed, world_size)

    def decode_local(self, wire, agreed, world_size):
        return self._decode(wire, agreed, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "memory": self._memory.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._memory.load(state.get("memory"))
