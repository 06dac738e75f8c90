"""Atomic checkpoints of everything a step needs, on every rank.

Layout inside ``<run_dir>/checkpoints``::

    step-00000050/shared.pt      rank 0: model, optimizer, engine state shared by all ranks,
                                 data position, config fingerprint
    step-00000050/rank-<r>.pt    every rank: its compressor residues and RNG state
    latest                       text: the name of the newest complete checkpoint

Each file is written to a temporary name and renamed; the directory is built as
``step-...tmp`` and renamed once every rank has written (a barrier between), and ``latest`` is
replaced last. A crash at any point leaves the previous checkpoint intact and ``latest``
pointing at it; a write that fails (a full disk) fails on every rank together
(:class:`CheckpointError`), with the unfinished directory removed. Loading uses
``torch.load(..., weights_only=True)``: tensors and plain data only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class CheckpointError(ValueError):
    """A checkpoint that could not be written (every rank raises it together); the previous
    checkpoint and ``latest`` are untouched and no step directory of it is left."""


def _space(path: Path) -> str:
    try:
        st = os.statvfs(path)
        return f"{st.f_bavail * st.f_frsize / 1e6:.2f} MB free on that file system"
    except OSError:
        return "free space unknown"


def _attempt(what: str, fn: Callable[[], Any], where: Path) -> str | None:
    try:
        fn()
        return None
    except Exception as exc:  # ENOSPC arrives as OSError or as torch's RuntimeError from its writer
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{what}: {text} ({_space(where)})"


def save(
    run_dir: Path,
    step: int,
    rank: int,
    shared_state: Callable[[], dict] | None,
    rank_state: dict,
    barrier: Callable[[], None],
    keep: int = 2,
    all_ok: Callable[[bool], bool] | None = None,
) -> Path:
    """Collective: every rank calls it at the same step.

    ``shared_state`` is called on rank 0 only (it may be None elsewhere). ``all_ok(ok)`` returns
    whether every rank's ``ok`` is true (a collective; the identity for one process): a rank
    that cannot write its part (a full disk, a vanished directory) makes every rank raise
    :class:`CheckpointError` after rank 0 has removed the unfinished ``step-...tmp``, so
    ``latest`` keeps naming the previous complete checkpoint.
    """
    agree = all_ok or (lambda ok: ok)
    root = Path(run_dir) / SUBDIR
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    previous = (root / "latest").read_text(encoding="utf-8").strip() if (root / "latest").is_file() else None

    def fail(err: str | None) -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        kept = f"latest still names {previous}" if previous else "there is no earlier checkpoint"
        mine = f"rank {rank}: {err}" if err else "another rank could not write its part"
        raise CheckpointError(
            f"checkpoint of step {step} in {str(root)!r} could not be written ({mine}); "
            f"nothing of it was kept and {kept}"
        )

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def publish() -> None:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:
            atomic_write_text(root / "latest", final.name + "\n")
        except Exception:
            if previous != final.name:  # latest names the previous one: drop what it does not name
                shutil.rmtree(final, ignore_errors=True)
            raise

    try:
        err = _attempt("preparing the step directory", prepare, Path(run_dir)) if rank == 0 else None
        if not agree(err is None):
            fail(err)
        err = _attempt(f"writing rank-{rank}.pt", lambda: atomic_save(rank_state, tmp / f"rank-{rank}.pt"), tmp)
        if rank == 0 and err is None:
            err = _attempt("writing shared.pt", lambda: atomic_save(shared_state(), tmp / "shared.pt"), tmp)  # type: ignore[misc]
        if not agree(err is None):
            fail(err)

        err = _attempt("publishing the checkpoint", publish, root) if rank == 0 else None
        if not agree(err is None):
            fail(err)
    except BaseException:
        # A collective failed (a peer or the link is gone) or the write did: leave no
        # half-written step directory behind (``latest`` still names the previous one).
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
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
        raise ValueError(
            f"checkpoint {str(path)!r} has no state for rank {rank} (it has {have}); "
            "resume with the world size it was saved with"
        )
    return load(path / "shared.pt"), load(rank_file)
