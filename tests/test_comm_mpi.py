"""dist_soup.comm over mpi4py: ``mpirun -n 2`` and ``-n 4`` of ``tests/mpi_exchange.py``.

The mpirun next to this Python (``pip install mpi4py mpich`` puts one in the venv) is used, else
one on PATH. When MPI truly cannot start a job here, the test is skipped with the reason printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("mpi_exchange.py")


def _mpirun() -> tuple[list[str] | None, str]:
    local = Path(sys.executable).parent / "mpirun"
    exe = str(local) if local.exists() else shutil.which("mpirun")
    if exe is None:
        return None, "no mpirun next to this Python or on PATH (pip install mpi4py mpich)"
    cmd = [exe]
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{exe} --version failed: {exc}"
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    probe = subprocess.run(
        cmd + ["-n", "1", sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return None, f"MPI cannot run a 1-process job here: {(probe.stderr or probe.stdout).strip()[-500:]}"
    return cmd, ""


@pytest.fixture(scope="module")
def mpirun() -> list[str]:
    cmd, reason = _mpirun()
    if cmd is None:
        print(f"skipping MPI tests: {reason}")
        pytest.skip(reason)
    return cmd


@pytest.mark.parametrize("nprocs", [2, 4])
def test_exchange_under_mpirun(mpirun, nprocs):
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_SOUP_COMPILE="0")
    proc = subprocess.run(
        mpirun + ["-n", str(nprocs), sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=180, env=env
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # ranks share one pipe, so their lines may interleave: look for the markers anywhere
    oks = sorted(re.findall(r"MPI-OK \d+/\d+", proc.stdout))
    assert oks == [f"MPI-OK {r}/{nprocs}" for r in range(nprocs)], out[-4000:]
