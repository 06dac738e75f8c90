"""``--set`` overrides that switch a codec or a recipe kind; codec options checked with the config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_soup import config as C

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _load(overrides):
    notes = []
    return C.load(QUICKSTART, overrides, on_note=notes.append), notes


def test_codec_switch_drops_the_files_options_with_a_note():
    cfg, notes = _load(["compression.update.name=adacomp"])
    assert cfg.compression.update == C.CodecConfig(name="adacomp", options={})
    assert cfg.compression.jacobian == C.CodecConfig(name="qsgd", options={"bits": 4})  # untouched
    assert notes == [
        "--set compression.update.name=adacomp drops the file's compression.update.options {bits: 4} (given for 'qsgd')"
    ]
    cfg, notes = _load(["compression.jacobian.name=topk", "compression.jacobian.options.ratio=0.05"])
    assert cfg.compression.jacobian.options == {"ratio": 0.05} and len(notes) == 1
    # Same name: nothing is stale.
    cfg, notes = _load(["compression.update.name=qsgd", "compression.update.options.bucket_size=128"])
    assert cfg.compression.update.options == {"bits": 4, "bucket_size": 128} and notes == []


def test_codec_switch_keeps_and_checks_options_given_by_set():
    cfg, notes = _load(["compression.update.options.bin_size=64", "compression.update.name=adacomp"])
    assert cfg.compression.update.options == {"bin_size": 64}
    with pytest.raises(C.ConfigError) as info:
        _load(["compression.update.name=adacomp", "compression.update.options.bits=4"])
    msg = str(info.value)
    assert msg.startswith("compression.update.options.bits: codec 'adacomp' has no option 'bits'")
    assert "bin_size, values, index_coding, error_feedback" in msg
    for internal in ("rank", "seed", "stream"):
        assert internal not in msg
    with pytest.raises(C.ConfigError, match=r"compression.update.options: \{bin_size: 1\} .*'adacomp'.*bin_size"):
        _load(["compression.update.name=adacomp", "compression.update.options.bin_size=1"])
    # A whole options mapping given by --set replaces the file's; nothing is left to drop.
    cfg, notes = _load(["compression.update.name=adacomp", "compression.update.options={values: fp16}"])
    assert cfg.compression.update.options == {"values": "fp16"} and notes == []


@pytest.mark.parametrize(
    "data, words",
    [
        ({"compression": {"update": {"name": "zip"}}}, ["compression.update.name", "'zip'", "adacomp", "qsgd"]),
        (
            {"compression": {"jacobian": {"name": "qsgd", "options": {"bitz": 4}}}},
            ["compression.jacobian.options.bitz", "'qsgd'", "bits, bucket_size"],
        ),
        (
            {"compression": {"update": {"name": "qsgd", "options": {"bits": 3}}}},
            ["compression.update.options", "{bits: 3}", "2, 4 or 8"],
        ),
        (
            {"compression": {"update": {"name": "qsgd", "options": {"seed": 1}}}},
            ["compression.update.options.seed", "its options"],
        ),
        (
            {"compression": {"mode": "allreduce", "update": {"name": "adacomp"}}},
            ["compression.mode", "'adacomp'", "allgather"],
        ),
    ],
)
def test_codec_options_are_checked_with_the_config(data, words):
    with pytest.raises(C.ConfigError) as info:
        C.from_dict(data)
    for w in words:
        assert w in str(info.value)


def test_another_codec_without_options_gets_its_own_defaults():
    assert C.from_dict({"compression": {"update": {"name": "adacomp"}}}).compression.update.options == {}
    assert C.from_dict({}).compression.update.options == {"bits": 4}
    # error_feedback is an option of every codec (build wraps the stream); a linear one stays linear.
    cfg = C.from_dict(
        {
            "compression": {
                "mode": "allreduce",
                "update": {"name": "randomk", "options": {"ratio": 0.1, "error_feedback": True}},
            }
        }
    )
    assert cfg.compression.update.options == {"ratio": 0.1, "error_feedback": True}


def test_task_and_solver_switches_drop_their_options_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: {name: msp_synth, options: {languages: 2}}\nsolver: {name: cagrad, options: {c: 0.5}}\n")
    notes = []
    cfg = C.load(path, ["task.name=toy2", "solver.name=mgda"], on_note=notes.append)
    assert cfg.task.options == {} and cfg.solver.options == {}
    assert notes == [
        "--set task.name=toy2 drops the file's task.options {languages: 2} (given for 'msp_synth')",
        "--set solver.name=mgda drops the file's solver.options {c: 0.5} (given for 'cagrad')",
    ]


def test_recipe_kind_switch_drops_what_the_new_kind_does_not_use():
    cfg, notes = _load(["recipe.kind=vs"])
    assert cfg.recipe.kind == "vs" and cfg.recipe.order is None
    assert notes == ["--set recipe.kind=vs drops the file's recipe.order: 'uas' (only used with recipe.kind vm)"]
    with pytest.raises(C.ConfigError) as info:
        _load(["recipe.kind=vs", "recipe.order=uas"])
    assert str(info.value) == "recipe.order: 'uas' is only used with recipe.kind vm (kind is 'vs')"
    cfg, notes = _load(["recipe.kind=vm", "recipe.order=usa"])
    assert cfg.recipe.order == "usa" and notes == []


def test_quickstart_with_adacomp_builds_an_exchange():
    from dist_soup.comm.exchange import Exchange

    cfg, _ = _load(["compression.update.name=adacomp"])
    c = cfg.compression
    ex = Exchange(c.update.name, c.mode, transport="local", bucket_mb=c.bucket_mb, seed=cfg.seed, **c.update.options)
    g = torch.randn(64, 32)
    out = ex.mean("w", g)
    assert out.shape == g.shape and ex.stats.bytes_sent < g.numel() * 4


def test_cli_switches_the_codec_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIST_SOUP_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_soup",
            "train",
            "--config",
            str(QUICKSTART),
            "--nproc",
            "2",
            "--steps",
            "3",
            "--run-dir",
            str(run_dir),
            "--set",
            "compression.update.name=adacomp",
            "--set",
            "logging.progress=none",
            "--set",
            "task.options={languages: 2, hidden: 32, layers: 1, n_train: 256, n_test: 64}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("dist-soup: note: --set compression.update.name=adacomp drops") == 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


def test_cli_refuses_a_bad_codec_option_before_starting(tmp_path):
    from dist_soup import cli

    code = cli.main(
        [
            "train",
            "--config",
            str(QUICKSTART),
            "--nproc",
            "2",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            "compression.update.name=adacomp",
            "--set",
            "compression.update.options.bits=4",
        ]
    )
    assert code == 2 and not (tmp_path / "r").exists()


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads ``3e-3`` as a string; a float key takes it as the number a user means."""
    cfg = C.from_dict(C.apply_overrides({}, ["optimizer.lr=3e-3", "compression.overlap_mb=2"]))
    assert cfg.optimizer.lr == 3e-3 and cfg.compression.overlap_mb == 2.0
    with pytest.raises(C.ConfigError, match="optimizer.lr: 'fast' is not a number"):
        C.from_dict(C.apply_overrides({}, ["optimizer.lr=fast"]))
    with pytest.raises(C.ConfigError, match="compression.overlap_mb"):
        C.from_dict(C.apply_overrides({}, ["compression.overlap_mb=0"]))
