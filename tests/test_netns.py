"""A 2-rank compressed all-reduce between two network-namespace hosts (launch/netns_hosts.sh).

Each rank runs in its own namespace (``ip netns exec``), so the gloo traffic really crosses the
veth link between them; the worker also checks that its ``eth0`` sent at least the payload.
Skipped, with the reason, where namespaces cannot be made (not root, no iproute2, no CAP_SYS_ADMIN).
Run as a script (``python tests/test_netns.py RANK WORLD ADDR PORT``) it is one such worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "netns_hosts.sh"
NUMEL = 200_000
TIMEOUT_S = 45


def _inputs(rank: int):
    import torch

    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(7 + rank))


def _tx_bytes() -> int:
    return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())


def _worker(rank: int, world: int, addr: str, port: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from dist_soup.comm import Exchange
    from dist_soup.process_group import init_process_group

    torch.set_num_threads(1)
    init_process_group(
        "gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    try:
        x = _inputs(rank)
        exact = sum(_inputs(r) for r in range(world)) / world
        tx0 = _tx_bytes()
        for mode in ("allgather", "allreduce"):
            ex = Exchange("identity", mode)
            got = ex.mean("x", x)
            assert torch.allclose(got, exact, rtol=1e-6, atol=1e-6), f"identity {mode}: wrong mean"
            assert ex.stats.bytes_sent >= 4 * NUMEL, (mode, ex.stats.bytes_sent)
        ex = Exchange("qsgd", "allgather", bits=8)
        got = ex.mean("x", x)
        err = float((got - exact).norm() / exact.norm())
        assert err < 0.05, f"qsgd 8-bit relative error {err:.3g}"
        assert 0 < ex.stats.bytes_sent < 4 * NUMEL / 3, ex.stats.bytes_sent
        sent = _tx_bytes() - tx0
        # The identity payloads alone are 2 x 4 x NUMEL bytes: they must have left through eth0.
        assert sent >= 8 * NUMEL, f"eth0 sent only {sent} bytes: the traffic did not cross the veth"
        print(f"rank {rank}: ok, eth0 sent {sent} bytes, qsgd8 err {err:.3g}", flush=True)
    finally:
        dist.destroy_process_group()


def test_exchange_between_two_namespace_hosts():
    from .netns_cluster import netns_unavailable

    why = netns_unavailable()
    if why is not None:
        print(f"skipping: {why}")
        pytest.skip(why)
    prefix = f"dst{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(
            ["bash", str(SCRIPT), "up", "--prefix", prefix, "--hosts", "2"],
            check=True,
            capture_output=True,
            text=True,
            timeout=20,
        )
        port = 29000 + os.getpid() % 2000
        # DIST_SOUP_COMPILE=0: eager codec kernels, so the test pays no torch.compile time.
        env = dict(
            os.environ,
            GLOO_SOCKET_IFNAME="eth0",
            OMP_NUM_THREADS="1",
            DIST_SOUP_COMPILE="0",
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        for rank in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        f"{prefix}_h{rank}",
                        sys.executable,
                        str(Path(__file__).resolve()),
                        str(rank),
                        "2",
                        "10.200.0.1",
                        str(port),
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        outputs = []
        for rank, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                pytest.fail(f"rank {rank} did not finish within {TIMEOUT_S} s:\n{out[-3000:]}")
            outputs.append(out)
            assert p.returncode == 0, f"rank {rank} failed (rc={p.returncode}):\n{out[-3000:]}"
        for rank, out in enumerate(outputs):
            assert f"rank {rank}: ok" in out, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["bash", str(SCRIPT), "down", "--prefix", prefix], capture_output=True, timeout=20)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in listed, f"namespaces left behind: {listed}"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
