"""The sweep runner (benchmarks/bandwidth_accuracy.py) and the DDP baseline config it compares against.

One tiny sweep (2 cells x 2 seeds: torch DDP fp32 and dist_soup ``ew`` + QSGD 4-bit, a few steps
of a tiny msp_synth, 2 processes per run, timing over 127.0.0.1) is run once for the module; the
tests check its outputs, rerun it half-finished, and feed the runner and the config bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "bandwidth_accuracy.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bandwidth_accuracy as sweep  # noqa: E402

from dist_soup import config as config_mod  # noqa: E402

from .netns_cluster import child_env  # noqa: E402

pytestmark = pytest.mark.timeout(240)

BASE = {
    # two objectives whose metrics are not 0 after a few steps (BLEU is), so Delta_m% is defined
    "task": {
        "name": "msp_synth",
        "options": {"languages": 1, "hidden": 8, "layers": 1, "n_train": 256, "n_test": 32},
        "objectives": ["asr_l0", "ssl"],
    },
    "recipe": {"kind": "vs"},
    "solver": {"name": "ew"},
    "selection": {"rule": "all"},
    "optimizer": {"name": "adam", "lr": 0.01},
    "train": {"batch_size": 8},
    "logging": {"every": 1},
}
SPEC = {
    "name": "tiny",
    "steps": 6,
    "eval_every": 3,
    "nproc": 2,
    "seeds": [0, 1],
    "grid": {
        "method": {
            "ddp_fp32": ["train.engine=ddp"],
            "qsgd4": {"compression.update": {"name": "qsgd", "options": {"bits": 4}}, "compression.mode": "allgather"},
        }
    },
    "rates": ["uncapped"],
    "timing": {"steps": 4, "warmup": 1},
    "target": ["ddp_fp32"],
    "target_tolerance": 1000.0,  # any evaluation reaches it: the column must be filled
    "versus": ["ddp_fp32"],
    "run_timeout_s": 180,
}
CELLS, SEEDS = ("ddp_fp32", "qsgd4"), (0, 1)


def write_spec(tmp: Path, spec: dict = SPEC, base: dict = BASE) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump({**spec, "base": {"config": str(tmp / "base.yaml")}}))
    return path


def run_sweep(spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), str(spec), "--out", str(out), "--loopback", "--eager", *extra],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=220,
    )


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    spec, out = write_spec(tmp), tmp / "out"
    r = run_sweep(spec, out)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return spec, out, r


def test_tiny_sweep_end_to_end(done):
    spec, out, r = done
    for cell in CELLS:
        for seed in SEEDS:
            assert f"{cell} seed {seed}: done (" in r.stdout
            assert (out / "runs" / cell / f"seed{seed}" / "summary.json").is_file()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    quality = [x for x in records if x["kind"] == "quality"]
    timing = [x for x in records if x["kind"] == "timing"]
    assert sorted((x["cell"], x["seed"]) for x in quality) == [(c, s) for c in CELLS for s in SEEDS]
    assert sorted(x["cell"] for x in timing) == sorted(CELLS)
    for t in timing:
        assert t["error"] is None and t["ms_median"] > 0 and t["n"] == 3 and t["loopback"] is True
    for q in quality:
        assert [e["steps"] for e in q["evals"]] == [3, 6]  # periodic evaluation, then the final model
        assert set(q["objectives"]) == {"asr_l0", "ssl"}
        assert q["bytes_per_step"] > 0 and q["ms_per_step_loopback"] > 0
    by = {(q["cell"], q["seed"]): q for q in quality}
    # DDP fp32 hands every gradient byte to its all-reduce; QSGD's payloads differ (on this tiny
    # model, whose tensors are under QSGD's min_numel and travel raw with headers, they are not smaller)
    dense = by[("ddp_fp32", 0)]["dense_bytes_per_step"]
    assert by[("ddp_fp32", 0)]["bytes_per_step"] == dense == by[("qsgd4", 0)]["dense_bytes_per_step"] > 0
    assert by[("qsgd4", 0)]["bytes_per_step"] not in (0, dense)
    # the seed changes the run
    assert (
        by[("qsgd4", 0)]["objectives"] != by[("qsgd4", 1)]["objectives"]
        or by[("qsgd4", 0)]["evals"] != by[("qsgd4", 1)]["evals"]
    )

    md = (out / "results.md").read_text()
    assert "### Quality (mean ± std over seeds)" in md and "### Speed and time to target" in md
    row = next(line for line in md.splitlines() if line.startswith("| qsgd4 |") and "±" in line)
    assert row.count("±") >= 4  # bytes, the two objectives and Delta_m% vs DDP fp32, over 2 seeds
    speed = [line for line in md.splitlines() if line.startswith("| qsgd4 |")][-1]
    assert "never" not in speed and speed.count("|") == 7  # 2 ms/step, target step, 2 times to target
    for name in ("quality_vs_bytes", "metric_vs_time_loopback", "metric_vs_time_uncapped", "step_time_vs_rate"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
        assert f"plots/{name}.png" in md


def test_ddp_cell_is_an_ordinary_training_run(done):
    """train.engine ddp through `dist-soup train`: the same run dir, evaluation and summary."""
    _, out, _ = done
    rd = out / "runs" / "ddp_fp32" / "seed0"
    s = json.loads((rd / "summary.json").read_text())
    assert s["engine"] == "ddp" and s["steps"] == 6 and s["world_size"] == 2
    assert s["comm"]["bytes_sent"] == s["comm"]["dense_bytes"] > 0  # DDP fp32: every gradient byte
    assert s["weights"] == {"asr_l0": 1.0, "ssl": 1.0} and s["selected"] == []
    cfg = config_mod.from_dict(yaml.safe_load((rd / "config.yaml").read_text()))
    assert s["config_sha256"] == config_mod.fingerprint(cfg) and cfg.train.engine == "ddp"
    lines = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "eval" in x] == [2, 5]
    steps = [x for x in lines if "losses" in x]
    assert [x["step"] for x in steps] == list(range(6)) and all(len(x["rank_step_s"]) == 2 for x in steps)


def test_half_finished_sweep_reruns_only_what_is_missing(done, tmp_path):
    spec, out, _ = done
    victim = out / "runs" / "qsgd4" / "seed1" / "summary.json"
    before = json.loads(victim.read_text())["param_sha256"]
    kept = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/summary.json") if p != victim}
    victim.unlink()  # as if that run had been killed before its end
    r = run_sweep(spec, out)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.count("done before, kept") == 3 and "qsgd4 seed 1: done (" in r.stdout
    assert "timing uncapped: every cell already timed" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished runs untouched
    assert json.loads(victim.read_text())["param_sha256"] == before  # deterministic from the seed


@pytest.mark.parametrize(
    "change, names",
    [
        (
            {"grid": {"method": {"ddp_fp32": ["train.stpes=3"]}}},
            "the overrides of cell ddp_fp32: config refused: unknown key train.stpes",
        ),
        ({"grid": {"method": {"ddp_fp32": ["train.engine=ddp", "ddp.hook=fp17"]}}}, "ddp.hook: 'fp17' is not allowed"),
        ({"grid": {"method": {"a b": []}}}, "grid.method: value name 'a b'"),
        ({"grid": {"method": {"a": "train.steps=3"}}}, "grid.method.a:"),
        ({"grid": []}, "grid: must be a mapping"),
        ({"seeds": [0, 0]}, "seeds: [0, 0] must be a non-empty list of distinct integers"),
        ({"rates": ["1gbps"]}, "rates: ['1gbps'] must be a list of distinct link rates"),
        ({"timing": {"steps": 4, "warmup": 4}}, "timing.warmup: 4 must be below timing.steps 4"),
        ({"target": ["nope"]}, "target: ['nope'] are not cells of the grid"),
        ({"stepz": 3}, "stepz: unknown key"),
        ({"nproc": 1}, "nproc: 1 must be an integer >= 2"),
        ({"steps": None}, "steps: None must be an integer >= 1"),
    ],
)
def test_malformed_spec_names_the_key(tmp_path, change, names):
    path = write_spec(tmp_path, {**SPEC, **change})
    with pytest.raises(sweep.SpecError) as exc:
        sweep.load_spec(path)
    assert names in str(exc.value) and str(path) in str(exc.value)


def test_malformed_spec_from_the_command_line(tmp_path):
    spec = {k: v for k, v in SPEC.items() if k != "seeds"}
    r = run_sweep(write_spec(tmp_path, spec), tmp_path / "out")
    assert r.returncode == 2 and "seeds: missing" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
    r = run_sweep(write_spec(tmp_path, SPEC), tmp_path / "out", "--quick")
    assert r.returncode == 2 and "quick: --quick needs a quick: section" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["train.engine=ddp", "ddp.hook=fp17"],
            "ddp.hook: 'fp17' is not allowed; use one of 'none', 'fp16', 'powersgd'",
        ),
        (["ddp.hook=fp16"], "ddp.hook: 'fp16' is only used with train.engine 'ddp' (engine is 'soup')"),
        (["train.engine=ddp", "ddp.powersgd_rank=4"], "ddp.powersgd_rank: 4 is only used with ddp.hook 'powersgd'"),
        (["train.engine=ddp", "ddp.hook=powersgd", "ddp.powersgd_rank=0"], "ddp.powersgd_rank: 0 must be > 0"),
        (["train.engine=ddp", "ddp.hook=powersgd", "ddp.powersgd_start=1"], "ddp.powersgd_start: 1 must be >= 2"),
        (["train.engine=dpp"], "train.engine: 'dpp' is not allowed; use one of 'soup', 'ddp'"),
        (["ddp.rank=2"], "unknown key ddp.rank; allowed keys in ddp: hook, powersgd_rank, powersgd_start, bucket_mb"),
    ],
)
def test_bad_ddp_config_values_are_clear_errors(tmp_path, sets, message):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(BASE))
    with pytest.raises(config_mod.ConfigError) as exc:
        config_mod.load(tmp_path / "c.yaml", sets)
    assert message in str(exc.value)


def test_ddp_config_errors_from_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(BASE))

    def cli(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "dist_soup",
                "train",
                "--config",
                str(tmp_path / "c.yaml"),
                "--run-dir",
                str(tmp_path / "run"),
                *args,
            ],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = cli("--nproc", "2", "--set", "train.engine=ddp", "--set", "ddp.hook=fp17")
    assert r.returncode == 2 and "ddp.hook: 'fp17' is not allowed" in r.stderr, r.stderr
    # DDP needs torch.distributed: a single process is refused before any step
    r = cli("--set", "train.engine=ddp", "--set", "train.steps=2")
    assert r.returncode == 2 and "train.engine: 'ddp' runs on torch.distributed" in r.stderr, r.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_link_rates_order_by_bandwidth():
    import sweep_report

    rates = ["uncapped", "1gbit", "100mbit", "500kbit", "2.5gbit"]
    assert sorted(rates, key=sweep_report._rate_bits) == ["500kbit", "100mbit", "1gbit", "2.5gbit", "uncapped"]
