"""process_group.init_process_group: destroy_process_group really ends the group, even when
torch.optim pulls in torch._dynamo (and with it torch.distributed.nn) after the group exists."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dist_soup.process_group import init_process_group, spawn_local


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names


def _worker(rank: int, world: int) -> None:
    from dist_soup import SoupEngine

    torch.set_num_threads(1)
    init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    engine = SoupEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        ("a", "b"),
        "0",
        "vs",
        solver="ew",
        mode="allreduce",
        update_compressor="identity",
        jacobian_compressor="identity",
    )
    out = model(torch.randn(16, 4))
    engine.step({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].pow(2).mean()})
    assert any(n.startswith("pt_gloo") for n in _thread_names())  # the group's workers are running
    dist.destroy_process_group()
    left = [n for n in _thread_names() if n.startswith(("pt_gloo", "gloo"))]
    # Threads still here would run into interpreter shutdown, where gloo can abort the process.
    assert not left, f"gloo threads outlived destroy_process_group: {left}"


def test_destroy_process_group_ends_gloo_threads():
    spawn_local(_worker, 2)
