"""Atomic checkpoints of everything a step needs, on every rank.

Layout inside ``<run_dir>/checkpoints``::

    step-00000050/shared.pt      rank 0: model, optimizer, engine state shared by all ranks,
                                 data position, config fingerprint
    step-00000050/rank-<r>.pt    every rank: its compressor residues and RNG state
    latest                       text: the name of the newest complete checkpoint

Each file is written to a temporary name and renamed; the directory is built as
``step-...tmp`` and renamed once every rank has written (a barrier between), and ``latest`` is
replaced last. A crash at any point leaves the previous checkpoint intact and ``latest``
pointing at it. Loading uses ``torch.load(..., weights_only=True)``: tensors and plain data only.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

SUBDIR = "checkpoints"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to ``path`` through a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> Any:
    """Read one checkpoint file; a damaged or foreign file raises ``ValueError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {str(path)!r} is missing") from None
    except Exception as exc:  # torch raises several types for damaged archives
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or not a dist_soup checkpoint: {exc}") from None


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = Path(run_dir) / SUBDIR
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = root / name
    if not name.startswith("step-") or not (path / "shared.pt").is_file():
        raise ValueError(f"{str(pointer)!r} points at {name!r}, which is not a complete checkpoint")
    return path


def save(
    run_dir: Path,
    step: int,
    rank: int,
    shared_state: Callable[[], dict] | None,
    rank_state: dict,
    barrier: Callable[[], None],
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it at the same step.

    ``shared_state`` is called on rank 0 only (it may be None elsewhere).
    """
    root = Path(run_dir) / SUBDIR
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    atomic_save(rank_state, tmp / f"rank-{rank}.pt")
    if rank == 0:
        atomic_save(shared_state(), tmp / "shared.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict]:
    """(shared state, this rank's state) of the checkpoint directory ``path``."""
    path = Path(path)
    rank_file = path / f"rank-{rank}.pt"
    if not rank_file.is_file():
        have = sorted(p.name for p in path.glob("rank-*.pt"))
        raise ValueError(f"checkpoint {str(path)!r} has no state for rank {rank} (it has {have}); resume with the world size it was saved with")
    return load(path / "shared.pt"), load(rank_file)
