"""The DeepSpeed plugin (dist_soup.integrations.deepspeed) with real DeepSpeed on real processes.

gloo on 127.0.0.1, 2 ranks spawned by ``tests.dist_utils``. Spawning and importing DeepSpeed
cost seconds on the 2-core machine, so one group (the ``checks`` fixture) runs most checks one
after another, each recording ``ok`` or its error per rank into a JSON file; each test reads
its check. The resume test needs fresh processes (and kills the first ones), and the CLI test
runs ``dist-soup train --deepspeed`` in a subprocess.

DeepSpeed JIT-builds a shared-memory op on its first init (about 25 s): ``TORCH_EXTENSIONS_DIR``
points at a cache that the spawned processes inherit.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from .dist_utils import run_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dist_soup" / "torch_extensions"))

BASE = {
    "train_micro_batch_size_per_gpu": 8,
    "steps_per_print": 10**9,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
}


# --- helpers that run inside the ranks --------------------------------------------------------
def _net(width: int = 32, depth: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(16, width), torch.nn.Tanh()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def _batch(rank: int, micro: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * micro + rank)
    x = torch.randn(8, 16, generator=g)
    return x.to(dtype), x.sum(1, keepdim=True).sin().to(dtype)


def _loss(engine, rank: int, micro: int, dtype=torch.float32):
    x, y = _batch(rank, micro, dtype)
    return (engine(x) - y).float().pow(2).mean()


def _init(net, cfg, **kw):
    from dist_soup.integrations import deepspeed as ds_soup

    return ds_soup.initialize(model=net, model_parameters=[p for p in net.parameters()], config=cfg, **kw)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (p.detach().float() - q.detach().float()).abs().max().item() for p, q in zip(a.parameters(), b.parameters())
    )


def _pair(rank: int, cfg: dict, section: dict, steps: int, dtype=torch.float32) -> dict:
    """Train DeepSpeed's own engine and the plugin's side by side; the largest parameter gap
    after every optimizer step."""
    from dist_soup.integrations import deepspeed as ds_soup

    a, b = _net(), _net()
    ea, *_, sa = deepspeed.initialize(model=a, model_parameters=a.parameters(), config=cfg)
    eb, *_, sb = _init(b, {**cfg, "dist_soup": section})
    assert type(eb).__name__ == "DistSoupDeepSpeedEngine" and isinstance(eb, deepspeed.DeepSpeedEngine)
    assert not eb.enable_backward_allreduce
    gas = ea.gradient_accumulation_steps()
    gaps, lrs = [], []
    for step in range(steps):
        for m in range(gas):
            for e in (ea, eb):
                e.backward(_loss(e, rank, step * gas + m, dtype))
                e.step()
        gaps.append(_max_diff(a, b))
        lrs.append((ea.get_lr()[0], eb.get_lr()[0]))
    st = ds_soup.stats(eb)
    out = {
        "gaps": gaps,
        "lrs": lrs,
        "stats": {k: v for k, v in st.items() if not isinstance(v, dict)},
        "numel": sum(p.numel() for p in b.parameters()),
        "global_steps": (ea.global_steps, eb.global_steps),
    }
    for e in (ea, eb):
        e.destroy()
    return out


# --- the checks of the shared group -------------------------------------------------------------
def check_identity(rank, world):
    cfg = {
        **BASE,
        "gradient_clipping": 0.05,
        "zero_optimization": {"stage": 0},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 4},
        },
    }
    return _pair(rank, cfg, {"compression": {"update": {"name": "identity"}}}, steps=5)


def check_accumulation(rank, world):
    cfg = {**BASE, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
    return _pair(rank, cfg, {"compression": {"update": {"name": "identity"}}}, steps=4)


def check_bf16(rank, world):
    cfg = {**BASE, "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    return _pair(rank, cfg, {"compression": {"update": {"name": "identity"}}}, steps=4, dtype=torch.bfloat16)


def check_qsgd(rank, world):
    from dist_soup.integrations import deepspeed as ds_soup

    net = _net(width=384, depth=2)
    engine, *_ = _init(
        net,
        {
            **BASE,
            "optimizer": {"type": "Adam", "params": {"lr": 3e-3, "torch_adam": True}},
            "dist_soup": {"compression": {"update": {"name": "qsgd", "options": {"bits": 4}}}},
        },
    )
    losses = []
    for step in range(30):
        loss = _loss(engine, rank, step % 4)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    st = ds_soup.stats(engine)
    same = _same_everywhere(net)
    engine.destroy()
    return {
        "losses": losses,
        "ratio": st["ratio"],
        "update_ratio": st["update"]["dense_bytes"] / st["update"]["bytes_sent"],
        "same": same,
    }


def check_skip(rank, world):
    """A NaN loss on rank 1 only: no rank updates, DeepSpeed counts a skipped step, the
    scheduler does not move; the next step trains again."""
    net = _net()
    cfg = {
        **BASE,
        "gradient_clipping": 1.0,
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 4},
        },
    }
    engine, *_ = _init(net, {**cfg, "dist_soup": {"compression": {"update": {"name": "qsgd"}}}})
    engine.backward(_loss(engine, rank, 0))
    engine.step()
    before = [p.detach().clone() for p in net.parameters()]
    lr = engine.get_lr()[0]
    loss = _loss(engine, rank, 1)
    engine.backward(loss * float("nan") if rank == 1 else loss)
    skipped = engine.soup_result.skipped
    engine.step()
    unchanged = all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    out = {
        "skipped": skipped,
        "unchanged": unchanged,
        "ds_skipped": engine.skipped_steps,
        "lr_kept": engine.get_lr()[0] == lr,
    }
    engine.backward(_loss(engine, rank, 2))
    engine.step()
    out["trains_again"] = not all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    engine.destroy()
    return out


def _same_everywhere(net) -> bool:
    flat = torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])
    hi, lo = flat.clone(), -flat
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    return bool(torch.equal(hi, flat) and torch.equal(-lo, flat))


MSP = dict(languages=2, hidden=32, n_train=256, n_test=32, eval_batch=32)
SOUP = dict(
    objectives=None,
    shared="encoder",
    recipe={"kind": "vm", "order": ["asr", "st", "ssl"]},
    solver={"name": "mgda"},
    selection={"rule": "threshold", "tau": 0.0, "probe_every": 3},
    solve_every=2,
    compression={
        "jacobian": {"name": "qsgd", "options": {"bits": 4}},
        "update": {"name": "qsgd", "options": {"bits": 4}},
    },
)


def check_multi_objective(rank, world):
    """msp_synth through the plugin (client Adam) and through SoupEngine (same Adam, seed, codecs)."""
    from dist_soup import tasks
    from dist_soup.engine import SoupEngine
    from dist_soup.moo.recipe import build_recipe

    task = tasks.build("msp_synth", **MSP)
    names = list(task.objectives)
    groups = {g: list(k) for g, k in task.groups.items()}
    ref, mine = task.build_model(0), task.build_model(0)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=3e-3)
    recipe = build_recipe("vm", names, groups, solver="mgda", order=("asr", "st", "ssl"))
    soup = SoupEngine(
        ref,
        opt_ref,
        names,
        "encoder",
        recipe,
        selection={"rule": "threshold", "tau": 0.0},
        probe_every=3,
        solve_every=2,
        jacobian_compressor="qsgd",
        jacobian_options={"bits": 4},
        update_compressor="qsgd",
        update_options={"bits": 4},
        transport="torch",
    )
    section = {**SOUP, "objectives": names, "groups": groups}
    engine, *_ = _init(
        mine,
        {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**9, "gradient_clipping": 0.0, "dist_soup": section},
        optimizer=torch.optim.Adam(mine.parameters(), lr=3e-3),
    )
    gaps, weights = [], []
    for step in range(5):
        batch = task.batch(torch.arange(8) + 16 * step + 8 * rank)
        r_ref = soup.step(task.losses(ref, batch))
        engine.backward(task.losses(engine, batch))
        engine.step()
        r_mine = engine.soup_result
        gaps.append(_max_diff(ref, mine))
        weights.append((r_ref.weights, r_mine.weights, r_ref.selected == r_mine.selected, r_mine.solved))
    engine.destroy()
    soup.reducer.remove()
    return {"gaps": gaps, "weights": weights}


def check_multi_accumulation(rank, world):
    """Several objectives with gradient accumulation 2: one exchange per optimizer step."""
    from dist_soup import tasks
    from dist_soup.integrations import deepspeed as ds_soup

    task = tasks.build("msp_synth", **MSP)
    names = list(task.objectives)
    model = task.build_model(0)
    section = {**SOUP, "objectives": names, "groups": {g: list(k) for g, k in task.groups.items()}}
    engine, *_ = _init(
        model, {**BASE, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "dist_soup": section}
    )
    first = None
    for micro in range(8):
        losses = task.losses(engine, task.batch(torch.arange(8) + 8 * micro + 64 * rank))
        engine.backward(losses)
        engine.step()
        first = first or engine.soup_result.losses
    st = ds_soup.stats(engine)
    out = {
        "exchanges": st["exchanges"],
        "global_steps": engine.global_steps,
        "update_dense": st["update"]["dense_bytes"],
        "numel": sum(p.numel() for p in model.parameters()),
        "finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
        "same": _same_everywhere(model),
    }
    engine.destroy()
    return out


BAD = {
    "unknown_key": ({"dist_soup": {"compresion": {}}}, "unknown key dist_soup.compresion"),
    "codec_mode": (
        {"dist_soup": {"compression": {"mode": "allreduce", "update": {"name": "adacomp", "options": {}}}}},
        "dist_soup.compression.mode",
    ),
    "stage3": ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage: 3"),
    "stage1": ({"zero_optimization": {"stage": 1}}, "supported: stage 0"),
    "onebit": ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, "OneBitAdam"),
    "fp16": ({"fp16": {"enabled": True}}, "fp16"),
    "no_shared_module": ({"dist_soup": {"objectives": ["a", "b"], "shared": "trunk"}}, "no submodule 'trunk'"),
}


def check_bad_inputs(rank, world):
    """Each bad input raises ConfigError on every rank before DeepSpeed's engine exists."""
    from dist_soup.config import ConfigError

    out = {}

    def attempt(name, cfg, expect):
        try:
            _init(_net(), cfg)
        except ConfigError as exc:
            out[name] = {"raised": True, "message": str(exc), "expected": expect in str(exc)}
        else:
            out[name] = {"raised": False}

    for name, (extra, expect) in BAD.items():
        attempt(name, {**BASE, **extra}, expect)
    # sections that differ between the ranks
    codec = "identity" if rank == 1 else "qsgd"
    attempt(
        "ranks_differ", {**BASE, "dist_soup": {"compression": {"update": {"name": codec, "options": {}}}}}, "differ"
    )
    # a bad key on rank 1 only: rank 0 must not go on into DeepSpeed and hang there
    section = {"solve_evry": 2} if rank == 1 else {}
    attempt("one_rank_bad", {**BASE, "dist_soup": section}, "solve_evry")
    # the group still works afterwards
    t = torch.ones(1)
    dist.all_reduce(t)
    out["group_alive"] = t.item() == world
    return out


CHECKS = [
    check_identity,
    check_accumulation,
    check_bf16,
    check_qsgd,
    check_skip,
    check_multi_objective,
    check_multi_accumulation,
    check_bad_inputs,
]


def _group(rank, world, out_dir):
    os.environ["LOCAL_RANK"] = str(rank)
    results = {}
    for check in CHECKS:
        try:
            results[check.__name__] = {"ok": True, "value": check(rank, world)}
        except Exception:
            results[check.__name__] = {"ok": False, "error": traceback.format_exc()}
        gc.collect()
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_checks")
    run_ranks(_group, 2, str(out))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _values(checks, name):
    for r, res in enumerate(checks):
        assert res[name]["ok"], f"rank {r}:\n{res[name]['error']}"
    return [res[name]["value"] for res in checks]


# --- tests ---------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_identity_matches_deepspeed_allreduce_step_for_step(checks):
    for v in _values(checks, "check_identity"):
        assert max(v["gaps"]) < 1e-6, v["gaps"]  # clipping (0.05) and the WarmupLR scheduler both active
        assert all(a == b for a, b in v["lrs"]) and v["lrs"][0][0] < v["lrs"][-1][0]
        assert v["global_steps"][0] == v["global_steps"][1] == 5


def test_gradient_accumulation_one_exchange_per_optimizer_step(checks):
    for v in _values(checks, "check_accumulation"):
        assert max(v["gaps"]) < 1e-6, v["gaps"]
        assert v["stats"]["exchanges"] == 4  # 8 micro-batches, 4 optimizer steps
        assert v["stats"]["dense_bytes"] == 4 * 4 * v["numel"]
    for v in _values(checks, "check_multi_accumulation"):
        assert v["global_steps"] == 4 and v["exchanges"] == 4
        assert v["update_dense"] == 4 * 4 * v["numel"]
        assert v["finite"] and v["same"]


def test_bf16_stage0_matches_deepspeed(checks):
    for v in _values(checks, "check_bf16"):
        assert max(v["gaps"]) < 1e-2, v["gaps"]


def test_qsgd_4bit_compresses_7x_and_trains(checks):
    for v in _values(checks, "check_qsgd"):
        assert v["ratio"] >= 7.0, v["ratio"]
        first, last = sum(v["losses"][:4]) / 4, sum(v["losses"][-4:]) / 4
        assert last < 0.7 * first, v["losses"]
        assert v["same"]


def test_nonfinite_step_is_skipped_on_every_rank(checks):
    for v in _values(checks, "check_skip"):
        assert v == {"skipped": True, "unchanged": True, "ds_skipped": 1, "lr_kept": True, "trains_again": True}


def test_multi_objective_agrees_with_soup_engine(checks):
    for v in _values(checks, "check_multi_objective"):
        assert max(v["gaps"]) < 1e-5, v["gaps"]
        for ref_w, mine_w, same_selection, _ in v["weights"]:
            assert same_selection
            assert all(abs(ref_w[k] - mine_w[k]) < 1e-6 for k in ref_w)
        assert any(solved for *_, solved in v["weights"])


@pytest.mark.parametrize("name", sorted(BAD) + ["ranks_differ", "one_rank_bad"])
def test_bad_input_clear_error_on_every_rank(checks, name):
    for r, v in enumerate(_values(checks, "check_bad_inputs")):
        assert v["group_alive"]
        assert v[name]["raised"], f"rank {r} did not raise for {name}"
        assert v[name]["expected"], f"rank {r}: {v[name]['message']}"


# --- save, kill, load ---------------------------------------------------------------------------
RESUME_CFG = {
    **BASE,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 5}},
    "dist_soup": {"compression": {"update": {"name": "qsgd", "options": {"bits": 2}}}},
}


def _train_steps(engine, rank, steps):
    gas = engine.gradient_accumulation_steps()
    for step in steps:
        for m in range(gas):
            engine.backward(_loss(engine, rank, step * gas + m) + 0.01 * torch.randn(()))  # draws from torch's RNG
            engine.step()


def _first_life(rank, world, ckdir, out):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(rank)
    net = _net(width=64)
    engine, *_ = _init(net, RESUME_CFG)
    _train_steps(engine, rank, range(3))
    engine.save_checkpoint(ckdir)
    _train_steps(engine, rank, range(3, 6))
    torch.save({n: p.detach().clone() for n, p in net.named_parameters()}, Path(out, f"ref{rank}.pt"))
    dist.barrier()
    os.kill(os.getpid(), signal.SIGKILL)  # no clean exit: the checkpoint on disk is all that is left


def _second_life(rank, world, ckdir, out):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(12345)  # whatever: the checkpoint restores this rank's generator
    net = _net(width=64, seed=7)  # other initial weights: the checkpoint restores them
    engine, *_ = _init(net, RESUME_CFG)
    path, _ = engine.load_checkpoint(ckdir)
    assert path is not None and engine.global_steps == 3 and engine.soup.step_count == 3
    _train_steps(engine, rank, range(3, 6))
    ref = torch.load(Path(out, f"ref{rank}.pt"), weights_only=True)
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), ref[n]), f"rank {rank}: {n} differs after resume"
    engine.destroy()


@pytest.mark.timeout(120)
def test_save_kill_load_resumes_exactly(tmp_path):
    ckdir = tmp_path / "ckpt"
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(_first_life, 2, str(ckdir), str(tmp_path))
    assert (ckdir / "latest").read_text().strip() == "global_step3"
    assert sorted(p.name for p in (ckdir / "global_step3").glob("dist_soup_rank*.pt")) == [
        "dist_soup_rank00000.pt",
        "dist_soup_rank00001.pt",
    ]
    run_ranks(_second_life, 2, str(ckdir), str(tmp_path))


# --- the CLI quickstart ---------------------------------------------------------------------------
QUICK = """\
task: {name: msp_synth, options: {languages: 2, hidden: 32, n_train: 256, n_test: 32, eval_batch: 32}}
recipe: {kind: vm, order: uas}
solver: {name: mgda}
selection: {rule: threshold, tau: 0.0, probe_every: 3}
compression:
  jacobian: {name: qsgd, options: {bits: 4}}
  update: {name: qsgd, options: {bits: 4}}
train: {steps: 4, batch_size: 16, solve_every: 2}
checkpoint: {every: 2}
logging: {every: 1, progress: plain}
"""


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dist_soup", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )


@pytest.mark.timeout(200)
def test_cli_quickstart_with_deepspeed(tmp_path):
    (tmp_path / "q.yaml").write_text(QUICK)
    run_dir = tmp_path / "run"
    ds_json = str(ROOT / "configs" / "deepspeed.json")
    p = _cli("--config", "q.yaml", "--deepspeed", ds_json, "--nproc", "2", "--run-dir", str(run_dir), cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert summary["deepspeed"]["zero_stage"] == 0 and summary["deepspeed"]["global_steps"] == 4
    assert summary["comm"]["ratio"] > 4
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert "SIGABRT" not in p.stderr and "Aborted" not in p.stderr
    # the run dir refuses a second fresh start (the check each rank makes), and --resume continues it
    from dist_soup import config as config_mod
    from dist_soup.config import ConfigError
    from dist_soup.integrations import deepspeed_train

    cfg = config_mod.load(tmp_path / "q.yaml", on_note=lambda _: None)
    ds = deepspeed_train._deepspeed_config(cfg, ds_json)
    with pytest.raises(ConfigError, match="--resume"):
        deepspeed_train._prepare(cfg, ds, run_dir, resume=False)
    assert deepspeed_train._prepare(cfg, ds, run_dir, resume=True)
    with pytest.raises(ConfigError, match="different config"):
        deepspeed_train._prepare(cfg, {**ds, "gradient_clipping": 2.0}, run_dir, resume=True)
    more = _cli(
        "--config",
        "q.yaml",
        "--deepspeed",
        ds_json,
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
        "--resume",
        "--steps",
        "6",
        cwd=tmp_path,
    )
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "resumed from" in more.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
