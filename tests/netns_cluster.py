"""Namespace "hosts" running torchrun agents: the harness of the fault tests and of
``benchmarks/faults_netns.py`` (whose process-tree helpers ``benchmarks/gpu_check.py`` uses too).

``Cluster`` makes N network namespaces with ``launch/netns_hosts.sh`` (its own prefix and
subnet, so it never meets another user's namespaces), starts ``launch/torchrun_multinode.sh``
in each, and offers the faults: SIGKILL a worker, kill a host (its agent and workers at once),
take a host's link down and up again, SIGTERM the workers. Everything it made is removed by
``down()`` (also on the way out of ``with Cluster(...)``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTS_SH = ROOT / "launch" / "netns_hosts.sh"
MULTINODE_SH = ROOT / "launch" / "torchrun_multinode.sh"
BIN = Path(sys.executable).parent

#: The run that the fault tests and ``benchmarks/faults_netns.py`` break: a small multidigits
#: job with a probe, QSGD with error feedback (residues in every checkpoint) and frequent
#: checkpoints. Copy it before changing it.
FAULT_CONFIG = {
    "task": {"name": "multidigits", "options": {"n_train": 512, "n_test": 200, "channels": 4, "hidden": 32}},
    "recipe": {"kind": "vs"},
    "solver": {"name": "mgda"},
    "selection": {"rule": "threshold", "probe_every": 5},
    "compression": {
        "jacobian": {"name": "qsgd", "options": {"bits": 4}},
        "update": {"name": "qsgd", "options": {"bits": 4, "error_feedback": True}},
    },
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"steps": 40, "batch_size": 16, "solve_every": 2},
    "checkpoint": {"every": 10, "keep": 2},
    "logging": {"every": 1, "progress": "none"},
    "seed": 3,
}


def child_env() -> dict:
    """The environment of a child ``python -m dist_soup`` (or torchrun) a test starts: one
    thread, this checkout first on the path, none of an enclosing launcher's variables."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def netns_unavailable() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found (apt-get install -y iproute2)"
    probe = f"dsfp{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _children_of() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, from every /proc/PID/stat (present under any kernel
    and sandbox, unlike /proc/PID/task/TID/children)."""
    out: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while we read
            continue
        out.setdefault(ppid, []).append(int(stat.parent.name))
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    return _children_of().get(pid, [])


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun starts each worker in a session of its own,
    so a process group does not reach them)."""
    below = _children_of()
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += below.get(found[-1], [])
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of the training lines of ``metrics.jsonl`` (eval lines excluded)."""
    path = Path(run_dir) / "metrics.jsonl"
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "losses" in rec:
                steps.append(rec["step"])
    return steps


def wait_for_step(run_dir: Path, step: int, timeout: float, procs=()) -> None:
    """Until ``metrics.jsonl`` logs ``step`` (or later); fails if ``procs`` all ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(run_dir)
        if steps and steps[-1] >= step:
            return
        if procs and all(p.poll() is not None for p in procs):
            raise RuntimeError(f"the run ended before step {step} (logged up to {steps[-1:]})")
        # A step of the fault tests' run takes 5-20 ms: a coarser poll lets a fast machine run
        # most of the way to the next checkpoint (or the end) before the test strikes.
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not logged within {timeout} s (logged up to {logged_steps(run_dir)[-1:]})")


class Cluster:
    def __init__(self, hosts: int = 2, prefix: str | None = None, subnet: str = "10.201.0", rate: str | None = None):
        self.hosts, self.subnet, self.rate = hosts, subnet, rate
        self.prefix = prefix or f"dsf{uuid.uuid4().hex[:6]}"
        self.agents: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}

    # --- namespaces -------------------------------------------------------------------------
    def up(self) -> Cluster:
        cmd = [
            "bash",
            str(HOSTS_SH),
            "up",
            "--prefix",
            self.prefix,
            "--hosts",
            str(self.hosts),
            "--subnet",
            self.subnet,
        ]
        if self.rate:
            cmd += ["--rate", self.rate]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)
        return self

    def down(self) -> None:
        for i in list(self.agents):
            self.kill_host(i)
        subprocess.run(["bash", str(HOSTS_SH), "down", "--prefix", self.prefix], capture_output=True, timeout=30)

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def ns(self, i: int) -> str:
        return f"{self.prefix}_h{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def link(self, i: int, state: str) -> None:
        """``ip link set eth0 up|down`` inside host ``i``."""
        subprocess.run(["ip", "-n", self.ns(i), "link", "set", "eth0", state], check=True, timeout=10)

    # --- agents -----------------------------------------------------------------------------
    def start(
        self,
        i: int,
        config: Path,
        run_dir: Path,
        *,
        nnodes: str = "2",
        nproc: int = 1,
        port: int = 29511,
        run_id: str = "faults",
        max_restarts: int = 1,
        join_timeout: int | None = None,
        log_dir: Path | None = None,
        extra: tuple[str, ...] = (),
        env: dict | None = None,
    ) -> subprocess.Popen:
        """Start ``launch/torchrun_multinode.sh`` in host ``i`` (host 0 owns the rendezvous)."""
        e = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            DIST_SOUP_COMPILE="0",
            GLOO_SOCKET_IFNAME="eth0",
            PYTHONPATH=str(ROOT),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            NNODES=nnodes,
            NPROC=str(nproc),
            RDZV=f"{self.addr(0)}:{port}",
            RUN_ID=run_id,
            MAX_RESTARTS=str(max_restarts),
            LOCAL_ADDR=self.addr(i),
            IS_HOST="1" if i == 0 else "0",
        )
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        if join_timeout is not None:
            e["JOIN_TIMEOUT"] = str(join_timeout)
        e.update(env or {})
        log = Path(log_dir or run_dir.parent) / f"host{i}.log"
        self.logs[i] = log
        fh = open(log, "w")
        p = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns(i),
                "bash",
                str(MULTINODE_SH),
                str(config),
                "--run-dir",
                str(run_dir),
                *extra,
            ],
            cwd=ROOT,
            env=e,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        self.agents[i] = p
        return p

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace") if i in self.logs else ""

    def workers(self, i: int) -> list[int]:
        """Worker pids of host ``i``'s agent (processes running ``dist_soup train``)."""
        p = self.agents[i]
        found, todo = [], [p.pid]
        while todo:
            pid = todo.pop()
            for c in children(pid):
                line = cmdline(c)
                if "dist_soup train" in line and "torchrun" not in line and "torch.distributed.run" not in line:
                    found.append(c)
                else:
                    todo.append(c)
        return sorted(found)

    def kill_worker(self, i: int, which: int = -1, sig: int = signal.SIGKILL) -> int:
        ws = self.workers(i)
        if not ws:
            raise RuntimeError(f"host {i} has no worker to kill")
        os.kill(ws[which], sig)
        return ws[which]

    def signal_workers(self, sig: int, hosts=None) -> list[int]:
        pids = [w for i in (hosts if hosts is not None else list(self.agents)) for w in self.workers(i)]
        for w in pids:
            os.kill(w, sig)
        return pids

    def tree(self, i: int) -> list[int]:
        """Host ``i``'s agent and every process below it."""
        p = self.agents.get(i)
        return tree(p.pid) if p is not None else []

    def kill_host(self, i: int) -> None:
        """SIGKILL everything host ``i``'s launcher started (agent and workers) at once."""
        pids = self.tree(i)
        p = self.agents.pop(i, None)
        if p is None:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    def wait(self, timeout: float) -> dict[int, int | None]:
        """Exit codes of the agents after at most ``timeout`` seconds (None: still running)."""
        deadline = time.monotonic() + timeout
        for p in self.agents.values():
            try:
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {i: p.poll() for i, p in self.agents.items()}
