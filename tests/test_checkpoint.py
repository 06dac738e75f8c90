"""Atomic checkpoint files: write-then-rename, latest pointer, corrupt files, weights_only."""

import os

import pytest
import torch

from dist_soup import checkpoint


def _save(run, step, keep=2):
    return checkpoint.save(
        run,
        step,
        0,
        lambda: {"step": step, "model": {"w": torch.full((3,), float(step))}},
        {"engine": {"r": torch.arange(4.0) + step}, "rng": torch.get_rng_state()},
        barrier=lambda: None,
        keep=keep,
    )


def test_save_load_latest_and_keep(tmp_path):
    for step in (5, 10, 15):
        _save(tmp_path, step)
    last = checkpoint.latest(tmp_path)
    assert last.name == checkpoint.step_dir_name(15)
    shared, mine = checkpoint.load_checkpoint(last, 0)
    assert shared["step"] == 15 and torch.equal(mine["engine"]["r"], torch.arange(4.0) + 15)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == [checkpoint.step_dir_name(10), checkpoint.step_dir_name(15)]
    assert not list((tmp_path / "checkpoints").rglob("*.tmp*"))


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    _save(tmp_path, 5)
    # a save that died after creating its temporary directory
    (tmp_path / "checkpoints" / (checkpoint.step_dir_name(10) + ".tmp")).mkdir()
    assert checkpoint.latest(tmp_path).name == checkpoint.step_dir_name(5)


def test_a_collective_failing_mid_save_leaves_no_step_directory(tmp_path):
    _save(tmp_path, 5)
    calls = []

    def all_ok(ok):  # the second agreement (after the parts are written) loses its peer
        calls.append(ok)
        if len(calls) == 2:
            raise RuntimeError("Connection closed by peer")
        return ok

    with pytest.raises(RuntimeError, match="Connection closed"):
        checkpoint.save(
            tmp_path, 10, 0, lambda: {"step": 10}, {"rng": torch.get_rng_state()}, barrier=lambda: None, all_ok=all_ok
        )
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert checkpoint.latest(tmp_path).name == checkpoint.step_dir_name(5)


def test_corrupt_and_missing_files_raise_clearly(tmp_path):
    path = _save(tmp_path, 5)
    (path / "shared.pt").write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load_checkpoint(path, 0)
    with pytest.raises(ValueError, match="no state for rank 3"):
        checkpoint.load_checkpoint(path, 3)


class Evil:
    """Any pickled class instance: weights_only loading must refuse it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"obj": Evil()}, path)
    with pytest.raises(ValueError, match="corrupt or not a dist_soup checkpoint"):
        checkpoint.load(path)


def test_atomic_save_never_leaves_partial_target(tmp_path, monkeypatch):
    target = tmp_path / "f.pt"
    checkpoint.atomic_save({"a": torch.ones(2)}, target)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"a": torch.zeros(2)}, target)
    assert torch.equal(checkpoint.load(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["f.pt"]
