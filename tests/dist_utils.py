"""Run a function on P real processes joined by gloo on 127.0.0.1 (torch.multiprocessing spawn)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from dist_soup.process_group import init_process_group, spawn_local


def _entry(rank: int, world: int, fn, args) -> None:
    torch.set_num_threads(1)
    init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo processes; re-raise a worker's failure."""
    spawn_local(_entry, world, fn, args)
