"""Run a function on P real processes joined by gloo on 127.0.0.1 (torch.multiprocessing spawn)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_soup.process_group import free_port, init_process_group


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` gloo processes; re-raise a worker's failure."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")
