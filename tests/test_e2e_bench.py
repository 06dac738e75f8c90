"""The end-to-end benchmark harness (benchmarks/e2e_hosts.py) runs and reports sensible figures.

Three tiny rows (the synchronised compute floor, torch DDP fp32, dist_soup ``ew`` + QSGD
4-bit), a few steps, two rounds, between two network-namespace hosts when they can be made
(root, iproute2), else two torchrun nodes on 127.0.0.1 (``--loopback``). Checks the printed
table, the JSON and the Markdown, not the timings.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "e2e_hosts.py"
ROWS = ("compute_sync", "ddp_fp32", "ew_qsgd4")
STEPS, WARMUP = 8, 3


def _netns_available() -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"dsbp{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


def test_e2e_harness_two_tiny_rows(tmp_path):
    netns = _netns_available()
    prefix = f"dsbt{uuid.uuid4().hex[:8]}"
    out = tmp_path / "e2e"
    cmd = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--rows",
        ",".join(ROWS),
        "--steps",
        str(STEPS),
        "--warmup",
        str(WARMUP),
        "--out",
        str(out),
        "--row-timeout",
        "90",
        "--rounds",
        "2",
        "--malloc-keep",
    ]
    cmd += ["--rate", "1gbit", "--prefix", prefix, "--subnet", "10.203.0"] if netns else ["--loopback"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        if netns:
            subprocess.run(
                ["bash", str(ROOT / "launch" / "netns_hosts.sh"), "down", "--prefix", prefix],
                capture_output=True,
                timeout=30,
            )
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    if netns:  # the harness removed its hosts itself
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in listed, listed

    data = json.loads(Path(f"{out}.json").read_text())
    md = Path(f"{out}.md").read_text()
    rows = {row["name"]: row for row in data["rows"]}
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        assert row["error"] is None, (name, row.get("log_tail"))
        assert row["n"] == STEPS - WARMUP
        assert row["ms_median"] > 0 and row["ms_mean"] > 0, row
        assert row["sent_bytes"] > 0, row
        assert row["speedup_vs_ddp_fp32"] > 0
        assert len(row["per_step_ms_rank0"]) == STEPS
        # two rounds: the figures are the medians of the rounds' own (ratios formed per round)
        assert len(row["rounds"]) == 2, row
        assert row["ms_median"] == statistics.median(x["ms_median"] for x in row["rounds"])
        assert row["speedup_vs_ddp_fp32"] == statistics.median(x["speedup_vs_ddp_fp32"] for x in row["rounds"])
        assert row["label"] in md and row["label"] in r.stdout
        if netns:
            assert row["eth0_tx_bytes"] > 0, row  # the traffic crossed the veth link
        # rank 0's CPU by thread (/proc): the training thread did the work
        threads = row["thread_cpu_ms"]
        train = sum(sum(v) for name, v in threads.items() if name.startswith("python"))
        assert train > 0 and all(x >= 0 for v in threads.values() for x in v), threads
        assert row["minor_faults"] >= 0
    assert rows["ddp_fp32"]["speedup_vs_ddp_fp32"] == 1.0 and data["setup"]["rounds"] == 2
    assert data["setup"]["malloc_keep"] and "--malloc-keep, every row" in md
    assert "| run | training thread | other threads |" in md
    assert "(round 2/2)" in r.stdout and "2 rounds: ms/step is the median" in md
    # QSGD 4-bit puts about 8x fewer bytes on the wire than fp32 buckets (tiny tensors: less)
    assert rows["ew_qsgd4"]["fewer_bytes_vs_ddp_fp32"] > 3.0
    m = data["machine"]
    assert m["cores"] >= 1 and m["torch"] and len(m["loadavg_start"]) == 3
    assert "| run | ms/step" in r.stdout and "load average" in r.stdout


def _engine_call_keywords(path: Path) -> set[str]:
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SoupEngine":
            return {k.arg for k in node.keywords}
    raise AssertionError(f"no SoupEngine(...) call in {path}")


def test_worker_builds_the_engine_as_train_does():
    """The benchmark measures what users run: its SoupEngine call passes what train.py's passes."""
    mine = _engine_call_keywords(ROOT / "benchmarks" / "e2e_worker.py")
    theirs = _engine_call_keywords(ROOT / "dist_soup" / "train.py")
    assert mine == theirs, f"update benchmarks/e2e_worker.py: missing {theirs - mine}, extra {mine - theirs}"
