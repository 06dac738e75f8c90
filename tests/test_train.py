"""The training front end end to end: CLI, run dir, resume, launchers, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dist_soup.process_group import free_port

from .netns_cluster import child_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SMALL = {
    "task": {"name": "multidigits", "options": {"n_train": 512, "n_test": 200, "channels": 4, "hidden": 32}},
    "recipe": {"kind": "vs"},
    "solver": {"name": "mgda"},
    "selection": {"rule": "threshold", "probe_every": 5},
    "compression": {
        "jacobian": {"name": "qsgd", "options": {"bits": 4}},
        "update": {"name": "qsgd", "options": {"bits": 4}},
    },
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"steps": 40, "batch_size": 16, "solve_every": 2},
    "checkpoint": {"every": 5, "keep": 2},
    "logging": {"every": 1, "progress": "plain"},
    "seed": 3,
}


def write_config(tmp_path: Path, data: dict = SMALL, name: str = "small.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_soup", *map(str, args)],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_two_process_run_writes_the_run_dir_and_a_table(tmp_path):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    out = cli("train", "--config", cfg, "--nproc", 2, "--run-dir", run)
    assert out.returncode == 0, out.stderr
    assert "bytes sent" in out.stdout and "run dir" in out.stdout and "left" in out.stdout
    s = summary(run)
    assert s["steps"] == 40 and s["world_size"] == 2
    assert set(s["objectives"]) == {"left", "right"}
    for o in s["objectives"].values():
        assert o["final_loss"] < o["first_loss"] and 0.2 < o["value"] <= 1.0  # chance is 0.1
    assert 0 < s["comm"]["bytes_sent"] < s["comm"]["dense_bytes"] / 4
    assert len(s["param_sha256"]) == 64 and s["time_s"] > 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(40))
    assert {"losses", "weights", "selected", "bytes_sent", "timings"} <= set(lines[0])
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 40
    # plots of the run
    out = cli("plot", run)
    assert out.returncode == 0, out.stderr
    for name in ("losses.png", "weights.png", "bytes.png", "selection.png"):
        assert (run / name).stat().st_size > 1000


def test_resume_continues_exactly(tmp_path):
    cfg = write_config(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("train", "--config", cfg, "--nproc", 2, "--run-dir", straight, "--steps", 10).returncode == 0
    first = cli("train", "--config", cfg, "--nproc", 2, "--run-dir", split, "--steps", 5)
    assert first.returncode == 0, first.stderr
    again = cli("train", "--config", cfg, "--nproc", 2, "--run-dir", split, "--steps", 10, "--resume")
    assert again.returncode == 0, again.stderr
    assert summary(split)["param_sha256"] == summary(straight)["param_sha256"]
    steps = [json.loads(l)["step"] for l in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10))


def test_bad_input_fails_clearly_and_overwrites_nothing(tmp_path):
    cfg = write_config(tmp_path)
    out = cli("train", "--config", tmp_path / "missing.yaml")
    assert out.returncode == 2 and "does not exist" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1,\n")
    out = cli("train", "--config", bad)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
    out = cli("train", "--config", cfg, "--set", "task.name=nosuchtask", "--run-dir", tmp_path / "r0")
    assert out.returncode == 2 and "unknown task 'nosuchtask'" in out.stderr and "msp_synth" in out.stderr
    out = cli("train", "--config", cfg, "--set", "solver.name=nosuchsolver", "--run-dir", tmp_path / "r1")
    assert out.returncode == 2 and "nosuchsolver" in out.stderr and "mgda" in out.stderr
    out = cli("train", "--config", cfg, "--nproc", 0)
    assert out.returncode == 2 and "--nproc 0" in out.stderr

    run = tmp_path / "run"
    assert cli("train", "--config", cfg, "--run-dir", run, "--steps", 5).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = cli("train", "--config", cfg, "--run-dir", run, "--steps", 5, "--set", "optimizer.lr=0.1", "--resume")
    assert out.returncode == 2 and "different config" in out.stderr
    out = cli("train", "--config", cfg, "--run-dir", run, "--steps", 5)
    assert out.returncode == 2 and "--resume" in out.stderr
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # a corrupt checkpoint file
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    (latest / "shared.pt").write_bytes(b"\0" * 100)
    out = cli("train", "--config", cfg, "--run-dir", run, "--steps", 8, "--resume")
    assert out.returncode == 2 and "corrupt" in out.stderr


def test_two_torchrun_nodes_on_one_machine(tmp_path):
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "twonodes",
                "-m",
                "dist_soup",
                "train",
                "--config",
                str(cfg),
                "--run-dir",
                str(run),
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert summary(run)["world_size"] == 2 and summary(run)["steps"] == 40


def test_killed_rank_restarts_from_the_last_checkpoint(tmp_path):
    data = json.loads(json.dumps(SMALL))
    data["train"]["steps"] = 60
    cfg = write_config(tmp_path, data)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            "-m",
            "dist_soup",
            "train",
            "--config",
            str(cfg),
            "--run-dir",
            str(run),
            "--resume",
        ],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    killed = None
    try:
        while time.time() < deadline and killed is None:
            time.sleep(0.02)  # steps take milliseconds: strike near step 12, well before the end
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and steps[-1] >= 12:
                # SIGKILL one worker (a child of torchrun running our run dir), as a crash would
                ps = subprocess.run(
                    ["pgrep", "-f", "--", f"--run-dir {run}"], capture_output=True, text=True
                ).stdout.split()
                workers = [int(p) for p in ps if int(p) != proc.pid]
                assert workers, "no worker process found"
                killed = max(workers)
                os.kill(killed, signal.SIGKILL)
        out = proc.communicate(timeout=max(10, deadline - time.time()))[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, "the run finished before a worker could be killed"
    assert proc.returncode == 0, out
    assert "resumed from" in out
    s = summary(run)
    assert s["steps"] == 60
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(60))  # no step lost: redone from the checkpoint, logged once


def test_mpirun_two_ranks(tmp_path):
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        pytest.skip(f"no mpirun next to {sys.executable}: pip install 'dist_soup[mpi]'")
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    out = subprocess.run(
        [
            str(mpirun),
            "-n",
            "2",
            sys.executable,
            "-m",
            "dist_soup",
            "train",
            "--config",
            str(cfg),
            "--run-dir",
            str(run),
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    s = summary(run)
    assert s["world_size"] == 2 and s["steps"] == 40 and s["comm"]["bytes_sent"] > 0


def test_ranks_with_different_configs_fail_together(tmp_path):
    cfg = write_config(tmp_path)
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "mismatch",
                "-m",
                "dist_soup",
                "train",
                "--config",
                str(cfg),
                "--run-dir",
                str(tmp_path / "run"),
                "--set",
                f"optimizer.lr={lr}",
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for lr in (0.01, 0.02)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0
        assert "different configs" in out, out[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_final_table_shows_the_ew_reference(capsys):
    from dist_soup import report, tasks
    from dist_soup.cli import print_summary

    task = tasks.build("multidigits")  # default options: a stored ew reference
    ref = task.ew_reference
    got = report.ew_reference(task, {"left": ref["left"], "right": ref["right"] * 1.1}, ("left", "right"))
    assert got["ew_reference"] == ref and got["delta_m_vs_ew"] == pytest.approx(-5.0)
    assert report.ew_reference(task, {"left": 0.5}, ("left",)) == {}  # one objective: nothing to weigh
    assert report.ew_reference(tasks.build("multidigits", hidden=32), {}, ("left", "right")) == {}
    objectives = {
        k: {"first_loss": 2.3, "final_loss": 0.3, "metric": "accuracy", "value": 0.9, "higher_is_better": True}
        for k in ("left", "right")
    }
    print_summary(
        {
            "objectives": objectives,
            "comm": {"bytes_sent": 10, "dense_bytes": 80, "ratio": 8.0},
            "world_size": 2,
            "steps": 200,
            "steps_per_s": 10.0,
            "time_s": 20.0,
            "delta_m": 1.0,
            "selected": [],
            **got,
        },
        "runs/x",
    )
    out = capsys.readouterr().out
    assert "ew ref" in out.splitlines()[2] and f"{ref['right']:.4f}" in out
    assert "Delta_m vs ew ref: -5.0%" in out
