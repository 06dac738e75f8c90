"""Resume a checkpoint written by P ranks on P' ranks.

What every rank shares (model, optimizer, the engine's weights, selection mask, recipe and
solver state, step and skip counters) is in ``shared.pt`` and carries over as it is. What is
per rank is folded from the P ``rank-<r>.pt`` files:

* **Error-feedback residues** (every floating tensor in a codec stream's state: the
  ``residue`` of error feedback and of the sparse codecs, CLTK's ``memory``): each of the P'
  new ranks holds the **mean of the P old ranks' residues** for that stream (a stream some old
  rank never built counts as zero there). A step's mean update is
  ``(1/P) sum_p (g_p + r_p)``: the gradient mass still owed to it is ``(1/P) sum_p r_p``. With
  every new rank holding ``rbar = (1/P) sum_p r_p`` it is ``(1/P') sum_p' rbar = rbar``: the
  same, so no gradient mass is lost or counted twice, whatever P and P'. (Giving each new rank
  the *sum* would multiply what is owed by P.)
* **Stream step counters** (they key a codec's random draws): the largest over the old ranks
  (they are equal in a healthy run: every rank calls every stream once per exchange).
* **RNG state**: new rank r < P keeps old rank r's; a new rank r >= P starts from
  ``torch.manual_seed(f(seed, step, r))``.

``two_phase`` exchanges cut each bucket into P chunks, one per server rank, each with its own
stream and residue: these do not map onto P' chunks, so such a checkpoint is refused with a
clear error (resume it on P ranks). The data position follows the step: the sampler draws
step s's batches of the new P'-rank layout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import checkpoint


class ResizeError(ValueError):
    """A checkpoint that cannot be resumed on a different number of ranks."""


def rank_files(path: Path) -> list[Path]:
    path = Path(path)
    files = {int(p.stem.split("-")[1]): p for p in path.glob("rank-*.pt") if p.stem.split("-")[1].isdigit()}
    if not files or sorted(files) != list(range(len(files))):
        raise ResizeError(f"checkpoint {str(path)!r} holds rank files {sorted(files)}; a complete one has 0..P-1")
    return [files[r] for r in range(len(files))]


def _fold_tree(values: list[Any], where: str) -> Any:
    """The fold of one node of P codec state trees (None: the old rank lacked it)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in present):
            raise ResizeError(f"{where}: the ranks' tensors differ in shape; cannot fold")
        if first.is_floating_point():
            total = torch.zeros_like(first, dtype=torch.float64)
            for v in present:
                total += v.to(torch.float64)
            return (total / len(values)).to(first.dtype)  # absent ranks count as zero
        if all(torch.equal(v, first) for v in present):
            return first.clone()
        raise ResizeError(f"{where}: the ranks hold different non-floating tensors; cannot fold")
    if isinstance(first, Mapping):
        keys = []
        for v in present:
            if not isinstance(v, Mapping):
                raise ResizeError(f"{where}: the ranks' states differ in structure")
            keys += [k for k in v if k not in keys]
        return {k: _fold_tree([v.get(k) if v is not None else None for v in values], f"{where}.{k}") for k in keys}
    if isinstance(first, bool) or isinstance(first, (str, float)):
        if all(v == first for v in present):
            return first
        raise ResizeError(f"{where}: the ranks hold different values {sorted(set(map(repr, present)))}; cannot fold")
    if isinstance(first, int):
        return max(present)  # stream step counters
    if isinstance(first, (list, tuple)):
        if not all(isinstance(v, (list, tuple)) and len(v) == len(first) for v in present):
            raise ResizeError(f"{where}: the ranks' lists differ in length")
        return type(first)(
            _fold_tree([v[i] if v is not None else None for v in values], f"{where}[{i}]") for i in range(len(first))
        )
    raise ResizeError(f"{where}: cannot fold a {type(first).__name__}")


def fold_exchange(states: list[Mapping[str, Any]], new_rank: int, new_world: int, name: str = "exchange") -> dict:
    """One new rank's ``Exchange.state_dict()`` from the P old ranks' (see the module doc)."""
    if not states:
        raise ResizeError(f"{name}: no rank states to fold")
    formats = {s.get("format") for s in states}
    if len(formats) != 1:
        raise ResizeError(f"{name}: the ranks' exchange states have different formats {formats}")
    if any(s.get("server") for s in states):
        raise ResizeError(
            f"{name}: this checkpoint has two_phase server streams, whose chunks are cut for "
            f"{len(states)} ranks; resume it on {len(states)} ranks"
        )
    streams = _fold_tree([dict(s.get("streams", {})) for s in states], f"{name}.streams")
    return {
        "format": states[0]["format"],
        "rank": new_rank,
        "world_size": new_world,
        "streams": streams or {},
        "server": {},
    }


def _new_rng(seed: int, step: int, rank: int) -> torch.Tensor:
    digest = hashlib.sha256(f"dist_soup-resize:{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1).get_state()


def fold_rank_states(states: list[Mapping[str, Any]], new_rank: int, new_world: int, *, seed: int, step: int) -> dict:
    """The ``rank-<r>.pt`` content of new rank ``new_rank`` of ``new_world`` from the P old ones."""
    keys = set(states[0].get("engine", {}))
    engine = {k: fold_exchange([s["engine"][k] for s in states], new_rank, new_world, k) for k in sorted(keys)}
    rng = states[new_rank]["rng"] if new_rank < len(states) else _new_rng(seed, step, new_rank)
    return {"engine": engine, "rng": rng}


def load_resized(path: Path, rank: int, world: int, *, mode: str, seed: int) -> tuple[dict, dict, int]:
    """``(shared, this rank's folded state, old world size)`` of checkpoint ``path`` on ``world``
    ranks. Refuses two_phase (see the module doc)."""
    path = Path(path)
    shared = checkpoint.load(path / "shared.pt")
    files = rank_files(path)
    old = int(shared.get("world_size", len(files)))
    if old != len(files):
        raise ResizeError(f"checkpoint {str(path)!r} says {old} ranks but holds {len(files)} rank files")
    if mode == "two_phase":
        raise ResizeError(
            f"checkpoint {str(path)!r} was saved by {old} ranks and this run has {world}: compression.mode "
            f"two_phase keeps residues per chunk of P={old} servers, which do not fold onto {world} ranks; "
            f"resume on {old} ranks (or switch to allgather/allreduce in a new run)"
        )
    states = [checkpoint.load(f) for f in files]
    mine = fold_rank_states(states, rank, world, seed=seed, step=int(shared["step"]))
    return shared, mine, old
