"""``benchmarks/gpu_check.py`` on gloo and the CPU (``--cpu --quick``).

The script is the one driver of the CUDA/NCCL path (run by hand where a GPU is lent), so CI runs
the same checks on the CPU to keep it working: every row must pass, and a broken row must fail
the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--quick", "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=400,
    )
    report = tmp_path / "gpu_check.json"
    rows = json.loads(report.read_text())["rows"] if report.exists() else []
    return proc, rows


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_every_check_passes_on_cpu(tmp_path):
    proc, rows = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {r["check"] for r in rows} == {"kernels", "engine", "deepspeed", "ddp_hook"}
    assert all(r["ok"] for r in rows), rows
    kernels = {r["name"]: r for r in rows if r["check"] == "kernels"}
    assert set(kernels) == {"qsgd4", "qsgd8", "adacomp", "fp16"}
    assert kernels["qsgd4"]["bits_per_value"] < 4.2  # 4 bits + one fp32 scale per 512 values
    trained = {r["check"]: r for r in rows if r["check"] in ("engine", "deepspeed")}
    for row in trained.values():
        assert row["world_size"] == 2 and row["skipped_steps"] == 0
        assert sum(last for _, last in row["losses"].values()) < sum(first for first, _ in row["losses"].values())
    hooked = [r for r in rows if r["check"] == "ddp_hook"]
    assert [r["name"] for r in hooked] == ["plain ddp fp32", "ddp + dist_soup qsgd4"]
    assert all(r["ranks_agree"] for r in hooked)
    # the hook sends QSGD 4-bit codes: far fewer bytes than DDP's fp32 buckets
    assert hooked[1]["sent_mb_per_step"] < hooked[0]["sent_mb_per_step"] / 5
    assert (tmp_path / "gpu_check.md").read_text().startswith("## GPU check")


@pytest.mark.timeout(120)
def test_a_failing_row_fails_the_run(tmp_path):
    # a config the training rows reject: the row fails with the log's tail, the exit status is 1
    proc, rows = _run(tmp_path, "--checks", "engine", "--set", "compression.mode=nonsense")
    assert proc.returncode == 1
    assert len(rows) == 1 and not rows[0]["ok"] and rows[0]["log_tail"]
    assert any("compression.mode" in line for line in rows[0]["log_tail"])


@pytest.mark.timeout(120)
def test_a_row_past_its_timeout_fails_and_leaves_no_worker(tmp_path):
    # A device run is short on time: a row that runs too long must end and be reported, not
    # hang. 5000 steps outlast 8 s, so the workers are training when the row times out (torchrun
    # starts them in sessions of their own: killing its process group would leave them running).
    t0 = time.monotonic()
    proc, rows = _run(tmp_path, "--checks", "engine", "--steps", "5000", "--row-timeout", "8")
    assert time.monotonic() - t0 < 60  # not after the orphaned workers' 5000 steps
    assert proc.returncode == 1
    assert len(rows) == 1 and not rows[0]["ok"] and rows[0]["error"].startswith("timed out"), rows
    left = subprocess.run(["pgrep", "-f", "--", f"--run-dir {tmp_path}"], capture_output=True, text=True).stdout
    assert not left.split(), left
