"""``dist-soup train --config FILE --deepspeed DS_JSON``: one rank of a run through the DeepSpeed plugin.

The YAML config says what to train (task, objectives, recipe, solver, selection, compression,
steps, seed) exactly as for ``dist-soup train``; it becomes the ``"dist_soup"`` section of the
DeepSpeed config, so the DeepSpeed JSON must not carry one. The DeepSpeed JSON says how:
``train_micro_batch_size_per_gpu`` (default ``train.batch_size``; if both are given they must
agree), ``gradient_accumulation_steps`` (``train.steps`` counts optimizer steps, each of that
many micro-batches), ``gradient_clipping``, ``bf16``, ZeRO stage 0, and optionally
``optimizer`` and ``scheduler`` (then DeepSpeed builds them and the config's ``optimizer``
section is not used; without them the config's optimizer and learning-rate schedule are used).

The run dir is the same as ``dist-soup train``'s (``config.yaml``, ``metrics.jsonl``,
``summary.json``), plus ``deepspeed.json`` (the DeepSpeed config as run) and DeepSpeed's
checkpoints in ``deepspeed/`` (``--resume`` continues from its ``latest``).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import time
from pathlib import Path

import torch

from .. import builders, checkpoint, process_group, report, tasks
from .. import config as config_mod
from .. import train as train_mod
from ..config import Config, ConfigError
from ..sampler import ShardedSampler
from . import deepspeed as ds_soup

CHECKPOINT_DIR = "deepspeed"


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops are cached (its shared-memory op takes ~25 s to build)."""
    return str(Path.home() / ".cache" / "dist_soup" / "torch_extensions")


def _deepspeed_config(cfg: Config, path) -> dict:
    ds = ds_soup.load_config(path)
    if ds_soup.SECTION in ds:
        raise ConfigError(
            f'--deepspeed {str(path)!r}: remove its "{ds_soup.SECTION}" section; with dist-soup train '
            "the section comes from --config (compression, recipe, solver, selection, train)"
        )
    micro = ds.setdefault("train_micro_batch_size_per_gpu", cfg.train.batch_size)
    if micro != cfg.train.batch_size:
        raise ConfigError(
            f"--deepspeed: train_micro_batch_size_per_gpu {micro!r} differs from train.batch_size "
            f"{cfg.train.batch_size} of --config; give one of them (e.g. --set train.batch_size={micro})"
        )
    ds.setdefault("steps_per_print", 10**9)  # dist-soup's own progress lines instead
    return ds


def _section(cfg: Config, task, objectives, groups, steps_per_epoch: int) -> dict:
    d = config_mod.to_dict(cfg)
    # The section has no task: its recipe names the groups themselves.
    recipe = dataclasses.asdict(builders.with_task_groups(cfg.recipe, task))
    return {
        "compression": d["compression"],
        "objectives": list(objectives),
        "shared": task.shared,
        "groups": {g: list(ks) for g, ks in groups.items()},
        "recipe": recipe,
        "solver": d["solver"],
        "selection": d["selection"],
        "solve_every": cfg.train.solve_every,
        "gram": cfg.train.gram,
        "nonfinite": cfg.train.nonfinite,
        "reuse_jacobian": cfg.train.reuse_jacobian,
        "steps_per_epoch": steps_per_epoch,
        "seed": cfg.seed,
    }


def run(cfg: Config, run_dir: Path, deepspeed_config, *, resume: bool = False, log=print) -> dict | None:
    """Train one rank through the plugin. Returns the summary on rank 0, None elsewhere."""
    torch.set_num_threads(int(os.environ.get("DIST_SOUP_THREADS", "1")))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    kind = process_group.launcher_env()
    if kind == "mpi":
        raise ConfigError("--deepspeed runs under torchrun, DeepSpeed's launcher or --nproc, not mpirun")
    if kind == "local":  # one process: DeepSpeed still wants a process group
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(process_group.free_port()),
        )
    os.environ.setdefault("LOCAL_RANK", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DIST_SOUP_BACKEND", "gloo")
    _, rank, world = process_group.init_distributed()
    engine = None
    try:
        engine, summary = _run(cfg, Path(run_dir), deepspeed_config, resume, rank, world, log)
        return summary
    finally:
        if engine is not None:
            engine.destroy()
        del engine
        gc.collect()
        process_group.shutdown_distributed("torch")


def _prepare(cfg: Config, ds: dict, run_dir: Path, resume: bool) -> bool:
    """Check the run dir against this config; True when there is a checkpoint to resume."""
    latest = run_dir / CHECKPOINT_DIR / "latest"
    have = latest.is_file()
    if have:
        import yaml

        same = False
        try:
            old = config_mod.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
            old_ds = json.loads((run_dir / "deepspeed.json").read_text())
            same = (
                config_mod.fingerprint(train_mod.without_steps(old))
                == config_mod.fingerprint(train_mod.without_steps(cfg))
                and old_ds == ds
            )
        except Exception:
            pass
        if not same:
            raise ConfigError(
                f"run dir {str(run_dir)!r} holds a checkpoint of a run with a different config or "
                "DeepSpeed config; use another --run-dir (nothing was overwritten)"
            )
        if not resume:
            raise ConfigError(
                f"run dir {str(run_dir)!r} already holds checkpoints ({latest.read_text().strip()}); "
                "pass --resume to continue it or choose another --run-dir (nothing was overwritten)"
            )
    return have and resume


def _run(cfg: Config, run_dir: Path, deepspeed_config, resume: bool, rank: int, world: int, log):
    torch.manual_seed(cfg.seed)
    task = tasks.build(cfg.task.name, **cfg.task.options)
    objectives = builders.objectives_of(cfg, task)
    groups = {g: tuple(k for k in ks if k in objectives) for g, ks in task.groups.items()}
    groups = {g: ks for g, ks in groups.items() if ks}
    ds = _deepspeed_config(cfg, deepspeed_config)
    ds_as_run = copy.deepcopy(ds)
    gas = int(ds.get("gradient_accumulation_steps", 1))
    model = task.build_model(cfg.seed)
    if torch.cuda.is_available() and os.environ.get("DIST_SOUP_BACKEND") != "gloo":
        model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    sampler = ShardedSampler(task.train_size(), cfg.train.batch_size, rank, world, cfg.seed)
    ds[ds_soup.SECTION] = _section(cfg, task, objectives, groups, max(1, sampler.steps_per_epoch // gas))
    restore = _prepare(cfg, ds_as_run, run_dir, resume)  # before any process joins DeepSpeed: fail fast
    own_optimizer = "optimizer" not in ds
    own_schedule = own_optimizer and "scheduler" not in ds
    client = builders.build_optimizer(cfg, model) if own_optimizer else None
    engine, optimizer, _, _ = ds_soup.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=client, config=ds
    )
    soup = engine.soup
    transport = soup.transport
    builders.agree_on_config(transport, cfg)
    if rank == 0 and not own_optimizer:
        log("[dist_soup] the DeepSpeed config's optimizer is used; the config's optimizer section is not")

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    transport.barrier()
    ckdir = run_dir / CHECKPOINT_DIR
    start, first_losses = 0, {}
    if restore:
        path, client_state = engine.load_checkpoint(str(ckdir))
        if path is None:
            raise ConfigError(f"run dir {str(run_dir)!r}: could not load the DeepSpeed checkpoint in {str(ckdir)!r}")
        start = int(client_state["dist_soup_step"])
        first_losses = dict(client_state.get("dist_soup_first_losses", {}))
        if rank == 0:
            log(f"[dist_soup] resumed from {path} at step {start}")
    if rank == 0:
        checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))
        checkpoint.atomic_write_text(run_dir / "deepspeed.json", json.dumps(ds_as_run, indent=2) + "\n")
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and not restore and metrics_path.exists():
        metrics_path.unlink()
    elif rank == 0 and restore and metrics_path.exists():
        report.truncate_metrics(metrics_path, start)

    def save(step: int) -> None:
        engine.save_checkpoint(
            str(ckdir),
            tag=f"step{step:08d}",
            client_state={"dist_soup_step": step, "dist_soup_first_losses": first_losses},
        )
        if rank == 0:
            _prune(ckdir, cfg.checkpoint.keep)
        transport.barrier()

    device = next(model.parameters()).device
    progress = report.Progress(cfg, start, rank)
    totals = {"bytes_sent": 0, "bytes_received": 0, "dense_bytes": 0}
    last_res = None
    t_start = time.perf_counter()
    with open(metrics_path if rank == 0 else os.devnull, "a", encoding="utf-8") as mfile:
        for step in range(start, cfg.train.steps):
            engine.train()
            if own_schedule:
                for group in optimizer.param_groups:
                    group["lr"] = cfg.optimizer.lr * builders.lr_factor(cfg, step)
            for micro in range(step * gas, (step + 1) * gas):
                batch = task.batch(sampler.indices(micro))
                if device.type != "cpu" and hasattr(batch, "to"):
                    batch = batch.to(device)
                losses = task.losses(engine, batch)
                engine.backward({k: losses[k] for k in objectives}, epoch=micro / sampler.steps_per_epoch)
                engine.step()
            res = last_res = engine.soup_result  # the boundary's, which exchanged
            if not first_losses:
                first_losses = dict(res.losses)
            for k in totals:
                totals[k] += getattr(res, k)
            if rank == 0 and (step % cfg.logging.every == 0 or step == cfg.train.steps - 1 or res.probed):
                mfile.write(json.dumps(report.metrics_line(res, step)) + "\n")
                mfile.flush()
            if cfg.logging.eval_every and (step + 1) % cfg.logging.eval_every == 0 and rank == 0:
                with torch.no_grad():
                    ev = task.evaluate(engine.module)
                mfile.write(json.dumps({"step": step, "eval": ev}) + "\n")
                engine.train()
            progress.update(step, res)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.train.steps:
                save(step + 1)
    progress.close()
    elapsed = time.perf_counter() - t_start
    save(cfg.train.steps)
    counts = torch.tensor([totals["bytes_sent"], totals["bytes_received"], totals["dense_bytes"]], dtype=torch.float64)
    if world > 1:
        transport.all_reduce_(counts, "sum")
    summary = None
    if rank == 0:
        summary = report.write_summary(
            run_dir, cfg, task, engine.module, soup, objectives, first_losses, last_res, counts, start, elapsed
        )
        summary["deepspeed"] = {
            "zero_stage": engine.zero_optimization_stage(),
            "bf16": engine.bfloat16_enabled(),
            "gradient_accumulation_steps": gas,
            "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
            "optimizer": type(engine.basic_optimizer).__name__,
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
        }
        checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    transport.barrier()
    return engine, summary


def _prune(ckdir: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoint tags (``latest`` always among them)."""
    import shutil

    tags = sorted(p for p in ckdir.glob("step*") if p.is_dir())
    latest = (ckdir / "latest").read_text().strip() if (ckdir / "latest").is_file() else None
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
