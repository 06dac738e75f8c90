"""Faults of a multi-host run, injected and timed (the README's reliability figures).

    python benchmarks/faults_netns.py clean                # no fault: the param_sha256 to reach
    python benchmarks/faults_netns.py worker --runs 10     # SIGKILL a worker, alternating hosts
    python benchmarks/faults_netns.py host                 # a whole host lost, NNODES=1:2 (elastic)
    python benchmarks/faults_netns.py host-fixed           # a whole host lost, NNODES=2
    python benchmarks/faults_netns.py link                 # eth0 down in host 1, then --resume
    python benchmarks/faults_netns.py preempt              # SIGTERM to every worker, then --resume
    python benchmarks/faults_netns.py all

Two namespace hosts (launch/netns_hosts.sh, prefix dsfb*, subnet 10.201.1.0/24) with
``NPROC`` (default 2) workers each run launch/torchrun_multinode.sh on the multidigits task
(``STEPS`` steps, a checkpoint every ``EVERY``). Needs root and iproute2. Each run prints one
JSON line; ``worker`` fails unless every run resumes on the first restart attempt. Not part of
the test suite (tests/test_faults.py does a few of these quickly).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns_cluster import FAULT_CONFIG, Cluster, logged_steps, netns_unavailable, wait_for_step  # noqa: E402

# The fault tests' run, longer, on more data, with sparser checkpoints.
CONFIG = json.loads(json.dumps(FAULT_CONFIG))
CONFIG["task"]["options"]["n_train"] = 1024
CONFIG["train"]["steps"] = 120
CONFIG["checkpoint"]["every"] = 20


class Watch(threading.Thread):
    """Polls metrics.jsonl: when each step was first seen after the last rewrite of the file."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.path = run / "metrics.jsonl"
        self.events: list[tuple[float, int, int]] = []  # (time, inode, last step)
        self.stop = False

    def run(self) -> None:
        last = None
        while not self.stop:
            try:
                ino = os.stat(self.path).st_ino
                steps = logged_steps(self.path.parent)
                cur = (ino, steps[-1] if steps else -1)
                if cur != last:
                    self.events.append((time.monotonic(), *cur))
                    last = cur
            except OSError:
                pass
            time.sleep(0.05)

    def resumed_at(self, after: float, ckpt: int) -> float | None:
        """First time after ``after`` that a step >= ``ckpt`` was logged in a rewritten file."""
        inode = None
        for t, ino, step in self.events:
            if t < after:
                inode = ino
                continue
            if ino != inode and step >= ckpt:
                return t
        return None

    def reached(self, after: float, step: int) -> float | None:
        for t, _, s in self.events:
            if t >= after and s >= step:
                return t
        return None


def setup(base: Path, **train) -> tuple[Path, Path]:
    base.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["train"].update(train)
    cfg["train"]["steps"] = int(os.environ.get("STEPS", cfg["train"]["steps"]))
    cfg["checkpoint"]["every"] = int(os.environ.get("EVERY", cfg["checkpoint"]["every"]))
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, base / "run"


def summary(run: Path) -> dict | None:
    p = run / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def nproc() -> int:
    return int(os.environ.get("NPROC", "2"))


def worker_loss(base: Path, i: int, port: int) -> dict:
    cfg, run = setup(base)
    host = i % 2
    kill_at = 45
    with Cluster(prefix=f"dsfb{i % 10}", subnet="10.201.1") as c:
        t_start = time.monotonic()
        agents = [c.start(h, cfg, run, nproc=nproc(), port=port, max_restarts=1, run_id=f"w{i}") for h in range(2)]
        w = Watch(run)
        w.start()
        wait_for_step(run, kill_at, 300, agents)
        t_first = w.reached(t_start, 0)
        t_kill = time.monotonic()
        killed_step = logged_steps(run)[-1]
        c.kill_worker(host)
        codes = c.wait(400)
        w.stop = True
        ckpt = (killed_step + 1) // CONFIG["checkpoint"]["every"] * CONFIG["checkpoint"]["every"]
        ckpt = min(ckpt, killed_step)
        t_res = w.resumed_at(t_kill, 0)
        t_back = w.reached(t_res or t_kill, killed_step) if t_res else None
        logs = c.log(0) + c.log(1)
        s = summary(run)
        return {
            "fault": "worker",
            "run": i,
            "host": host,
            "codes": codes,
            "cold_start_s": round(t_first - t_start, 2) if t_first else None,
            "ok": all(v == 0 for v in codes.values()) and s is not None,
            "killed_step": killed_step,
            "steps_lost": killed_step + 1 - ckpt,
            "resume_s": round(t_res - t_kill, 2) if t_res else None,
            "back_to_killed_step_s": round(t_back - t_kill, 2) if t_back else None,
            "connect_refused": logs.count("Connection refused"),
            # generation 2: the first restart of the process group is the one that resumed
            "resumed_first_attempt": "(process group generation 2)" in logs and "generation 3" not in logs,
        }


def host_loss(base: Path, elastic: bool, port: int) -> dict:
    cfg, run = setup(base)
    with Cluster(prefix="dsfbh", subnet="10.201.1") as c:
        env = {"LAST_CALL_TIMEOUT": "5"}
        agents = [
            c.start(
                h,
                cfg,
                run,
                nnodes="1:2" if elastic else "2",
                nproc=nproc(),
                port=port,
                max_restarts=1,
                join_timeout=30,
                env=env,
                run_id="host",
            )
            for h in range(2)
        ]
        w = Watch(run)
        w.start()
        wait_for_step(run, 45, 300, agents)
        killed_step = logged_steps(run)[-1]
        t_kill = time.monotonic()
        c.kill_host(1)
        codes = c.wait(400)
        t_end = time.monotonic()
        w.stop = True
        t_res = w.resumed_at(t_kill, 0)
        s = summary(run)
        log0 = c.log(0)
        return {
            "fault": "host-elastic" if elastic else "host-fixed",
            "codes": codes,
            "killed_step": killed_step,
            "survivor_exit_s": round(t_end - t_kill, 2),
            "resume_s": round(t_res - t_kill, 2) if t_res else None,
            "finished_world_size": s["world_size"] if s else None,
            "steps": s["steps"] if s else None,
            "message": [l for l in log0.splitlines() if "communication failed" in l or "torchrun_multinode.sh:" in l][
                :2
            ],
        }


def link_failure(base: Path, port: int, timeout_s: float = 20.0) -> dict:
    cfg, run = setup(base, timeout_s=timeout_s)
    with Cluster(prefix="dsfbl", subnet="10.201.1") as c:
        link_env = {"READ_TIMEOUT": "10", "AGENT_GRACE": "5"}
        agents = [
            c.start(
                h, cfg, run, nproc=nproc(), port=port, max_restarts=0, join_timeout=10, run_id="link1", env=link_env
            )
            for h in range(2)
        ]
        wait_for_step(run, 45, 300, agents)
        killed_step = logged_steps(run)[-1]
        t_down = time.monotonic()
        c.link(1, "down")
        exits, reported = {}, {}
        deadline = t_down + 400
        while len(exits) < 2 and time.monotonic() < deadline:
            for h, p in c.agents.items():
                if h not in reported and "communication failed" in c.log(h):
                    reported[h] = round(time.monotonic() - t_down, 2)
                if h not in exits and p.poll() is not None:
                    exits[h] = round(time.monotonic() - t_down, 2)
            time.sleep(0.1)
        msgs = [l for h in (0, 1) for l in c.log(h).splitlines() if "communication failed" in l]
        from dist_soup import checkpoint

        kept = checkpoint.latest(run)
        c.link(1, "up")
        c.agents.clear()
        t_up = time.monotonic()
        (base / "again").mkdir(exist_ok=True)
        for h in range(2):
            c.start(h, cfg, run, nproc=nproc(), port=port + 1, max_restarts=0, run_id="link2", log_dir=base / "again")
        codes = c.wait(400)
        s = summary(run)
        return {
            "fault": "link",
            "timeout_s": timeout_s,
            "env": link_env,
            "killed_step": killed_step,
            "worker_message_s": reported,
            "agent_exit_s": exits,
            "kept": kept.name if kept else None,
            "steps_lost": killed_step + 1 - int(kept.name.split("-")[1]) if kept else None,
            "resume_codes": codes,
            "resume_run_s": round(time.monotonic() - t_up, 2),
            "finished": s is not None,
            "messages": msgs[:4],
        }


def preemption(base: Path, port: int) -> dict:
    cfg, run = setup(base)
    with Cluster(prefix="dsfbp", subnet="10.201.1") as c:
        agents = [c.start(h, cfg, run, nproc=nproc(), port=port, max_restarts=0, run_id="pre1") for h in range(2)]
        wait_for_step(run, 45, 300, agents)
        t_sig = time.monotonic()
        c.signal_workers(signal.SIGTERM)
        codes = c.wait(120)
        t_exit = time.monotonic()
        from dist_soup import checkpoint

        kept = checkpoint.latest(run)
        c.agents.clear()
        (base / "again").mkdir(exist_ok=True)
        for h in range(2):
            c.start(h, cfg, run, nproc=nproc(), port=port + 1, max_restarts=0, run_id="pre2", log_dir=base / "again")
        codes2 = c.wait(400)
        s = summary(run)
        return {
            "fault": "preempt",
            "exit_s": round(t_exit - t_sig, 2),
            "codes": codes,
            "checkpoint": kept.name if kept else None,
            "resume_codes": codes2,
            "finished": s is not None,
            "param_sha256": s["param_sha256"] if s else None,
        }


def clean(base: Path, port: int) -> dict:
    """The uninterrupted run: its param_sha256 is what every resumed run must reach."""
    cfg, run = setup(base)
    with Cluster(prefix="dsfbc", subnet="10.201.1") as c:
        t0 = time.monotonic()
        for h in range(2):
            c.start(h, cfg, run, nproc=nproc(), port=port, max_restarts=0, run_id="clean")
        codes = c.wait(400)
        s = summary(run)
        return {
            "fault": "none",
            "codes": codes,
            "run_s": round(time.monotonic() - t0, 2),
            "param_sha256": s["param_sha256"] if s else None,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fault", choices=["clean", "worker", "host", "host-fixed", "link", "preempt", "all"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default="/tmp/dist_soup_faults")
    args = ap.parse_args()
    why = netns_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    results = []
    port = 29600
    todo = ["clean", "worker", "host", "host-fixed", "link", "preempt"] if args.fault == "all" else [args.fault]
    for fault in todo:
        if fault == "worker":
            for i in range(args.runs):
                results.append(worker_loss(out / f"worker{i}", i, port + 10 * i))
                print(json.dumps(results[-1]), flush=True)
        else:
            fn = {
                "clean": lambda: clean(out / "clean", port + 190),
                "host": lambda: host_loss(out / "host", True, port + 200),
                "host-fixed": lambda: host_loss(out / "hostfixed", False, port + 210),
                "link": lambda: link_failure(out / "link", port + 220),
                "preempt": lambda: preemption(out / "preempt", port + 230),
            }[fault]
            results.append(fn())
            print(json.dumps(results[-1]), flush=True)
    workers = [r for r in results if r["fault"] == "worker"]
    if workers:
        good = sum(bool(r["resumed_first_attempt"]) and r["ok"] for r in workers)
        print(f"worker loss: {good}/{len(workers)} runs resumed on the first restart attempt", flush=True)
        return 0 if good == len(workers) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
