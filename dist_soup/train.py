"""One rank of a training run: config -> task, model, engine -> steps -> run dir.

The pieces live beside it: the process group (:mod:`dist_soup.process_group`), the sampler
(:mod:`dist_soup.sampler`), what a config builds (:mod:`dist_soup.builders`) and what a run
writes (:mod:`dist_soup.report`); this module is the loop and the run dir's life: resume,
checkpoints, faults (:mod:`dist_soup.faults`), resizing (:mod:`dist_soup.resize`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from . import checkpoint, faults, process_group, report, resize, tasks
from . import config as config_mod
from .builders import agree_on_config, build_optimizer, lr_factor, objectives_of, recipe_from_config
from .config import Config, ConfigError
from .ddp_baseline import DDPBaseline
from .engine import SoupEngine
from .sampler import ShardedSampler


def run(cfg: Config, run_dir: Path, *, resume: bool = False, log=print) -> dict | None:
    """Train one rank. Returns the summary on rank 0, None elsewhere.

    Exits (``SystemExit``) with :data:`faults.EXIT_PREEMPTED` after a SIGTERM (a checkpoint at
    the next step boundary, on every rank); the process ends at once (``os._exit``) with
    :data:`faults.EXIT_PEER_LOST` when the torch.distributed group's collectives fail (a peer
    died, a link is down, ``train.timeout_s`` ran out), after a message naming the silent peers.
    """
    torch.set_num_threads(int(os.environ.get("DIST_SOUP_THREADS", "1")))
    with faults.Preemption() as preemption:
        progress = {"step": None}
        try:
            kind, rank, world = process_group.init_distributed(cfg.train.timeout_s)
        except Exception as exc:
            if not faults.is_comm_error(exc):
                raise
            faults.warn(
                f"[dist_soup] rank {os.environ.get('RANK', '?')}: could not join the process group: "
                f"{faults._first_line(exc)}"
            )
            raise SystemExit(faults.EXIT_PEER_LOST) from None
        broken = False
        try:
            return _run(cfg, Path(run_dir), resume, kind, rank, world, log, preemption, progress)
        except faults.Preempted as p:
            if rank == 0:
                log(f"[dist_soup] {p}; exit code {faults.EXIT_PREEMPTED}, --resume continues")
            raise SystemExit(faults.EXIT_PREEMPTED) from None
        except Exception as exc:
            if kind != "torch" or not faults.is_comm_error(exc):
                raise
            broken = True
            msg = (
                process_group.PEERS.diagnose(exc, progress["step"], stop=lambda: preemption.requested)
                if process_group.PEERS
                else f"[dist_soup] rank {rank}: communication failed: {faults._first_line(exc)}"
            )
            try:
                last = checkpoint.latest(run_dir) if (Path(run_dir) / checkpoint.SUBDIR / "latest").is_file() else None
            except ValueError:
                last = None
            faults.warn(
                msg
                + (
                    f" The run dir keeps {last.name}; rerun with --resume once the fault is fixed."
                    if last
                    else " No checkpoint was written yet."
                )
            )
            # Leave now: tearing down a process group whose peers are gone can block (gloo
            # pairs, store requests to an unreachable host), and the launcher is waiting.
            sys.stdout.flush()
            os._exit(faults.EXIT_PEER_LOST)
        finally:
            if not broken:
                process_group.shutdown_distributed(kind)


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, rank: int) -> Path | None:
    """Check the run dir against this config; the checkpoint to resume from, or None."""
    cfg_file = run_dir / "config.yaml"
    last = checkpoint.latest(run_dir) if (run_dir / checkpoint.SUBDIR).exists() else None
    if cfg_file.exists():
        try:
            old = config_mod.from_dict(yaml.safe_load(cfg_file.read_text()))
        except Exception as exc:
            raise ConfigError(
                f"run dir {str(run_dir)!r} holds an unreadable config.yaml ({exc}); use another --run-dir"
            ) from None
        same = config_mod.fingerprint(without_steps(old)) == config_mod.fingerprint(without_steps(cfg))
        if last is not None and not same:
            raise ConfigError(
                f"run dir {str(run_dir)!r} holds a checkpoint of a run with a different config; "
                "use another --run-dir (nothing was overwritten)"
            )
    if last is not None and not resume:
        raise ConfigError(
            f"run dir {str(run_dir)!r} already holds checkpoints ({last.name}); pass --resume to continue "
            "it or choose another --run-dir (nothing was overwritten)"
        )
    return last if resume else None


def without_steps(cfg: Config) -> Config:
    """The config minus what may change on resume (the total number of steps)."""
    import copy

    c = copy.deepcopy(cfg)
    c.train.steps = 0
    c.train.timeout_s = 0.0
    return c


def _run(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    kind,
    rank: int,
    world: int,
    log,
    preemption: faults.Preemption | None = None,
    progress_at: dict | None = None,
) -> dict | None:
    progress_at = {} if progress_at is None else progress_at
    torch.manual_seed(cfg.seed)
    task = tasks.build(cfg.task.name, **cfg.task.options)
    objectives = objectives_of(cfg, task)
    groups = {g: tuple(k for k in ks if k in objectives) for g, ks in task.groups.items()}
    groups = {g: ks for g, ks in groups.items() if ks}
    device = process_group.device_for(kind)
    model = task.build_model(cfg.seed).to(device)
    optimizer = build_optimizer(cfg, model)
    sampler = ShardedSampler(task.train_size(), cfg.train.batch_size, rank, world, cfg.seed)
    if cfg.train.engine == "ddp":  # the torch DDP baseline on the same task, data and optimizer
        engine: DDPBaseline | SoupEngine = DDPBaseline(
            model,
            optimizer,
            objectives,
            cfg.ddp,
            nonfinite=cfg.train.nonfinite,
            seed=cfg.seed,
            find_unused_parameters=len(objectives) < len(task.objectives),
        )
    else:
        engine = SoupEngine(
            model,
            optimizer,
            objectives,
            task.shared,
            recipe_from_config(cfg, task, objectives, groups, sampler.steps_per_epoch),
            steps_per_epoch=sampler.steps_per_epoch,
            transport=kind,
            **config_mod.engine_options(cfg),
        )
    transport = engine.transport
    agree_on_config(transport, cfg)

    start = 0
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    transport.barrier()
    restore = _prepare_run_dir(cfg, run_dir, resume, rank)
    first_losses: dict[str, float] = {}
    if restore is not None:
        shared = checkpoint.load(restore / "shared.pt")
        if shared.get("world_size") == world:
            shared, mine = checkpoint.load_checkpoint(restore, rank)
        else:  # resize: fold the old ranks' residues (dist_soup.resize)
            shared, mine, old_world = resize.load_resized(
                restore, rank, world, mode=cfg.compression.mode, seed=cfg.seed
            )
            if rank == 0:
                log(
                    f"[dist_soup] resizing: checkpoint of {old_world} ranks resumed on {world} "
                    "(each rank holds the mean of the old ranks' residues)"
                )
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
        engine.load_state_dict({**shared["engine"], **mine["engine"]})
        torch.set_rng_state(mine["rng"])
        start = int(shared["step"])
        first_losses = dict(shared.get("first_losses", {}))
        if rank == 0:
            gen = f" (process group generation {process_group.GENERATION})" if process_group.GENERATION else ""
            log(f"[dist_soup] resumed from {restore} at step {start}{gen}")
    if rank == 0:
        checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and restore is None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in a run dir without checkpoints starts a fresh log
    elif rank == 0 and restore is not None and metrics_path.exists():
        report.truncate_metrics(metrics_path, start)

    def shared_state() -> dict:
        es = engine.state_dict()
        return {
            "step": engine.step_count,
            "world_size": world,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "engine": {k: es[k] for k in ("step", "skipped", "w", "mask", "recipe") if k in es},
            "first_losses": first_losses,
            "config_sha256": config_mod.fingerprint(cfg),
        }

    def save() -> Path:
        es = engine.state_dict()
        mine = {"engine": {k: es[k] for k in ("j_exchange", "u_exchange") if k in es}, "rng": torch.get_rng_state()}
        return checkpoint.save(
            run_dir,
            engine.step_count,
            rank,
            shared_state if rank == 0 else None,
            mine,
            transport.barrier,
            keep=cfg.checkpoint.keep,
            all_ok=all_ok,
        )

    def all_ok(ok: bool) -> bool:
        if world == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], dtype=torch.float64)
        transport.all_reduce_(flag, "min")
        return bool(flag.item() > 0)

    control = faults.StepControl(transport, world, rank)
    pending_lines: dict[int, dict] = {}

    def write_lines(done) -> bool:
        """Write the log line of the step whose reduction ``done`` is; its stop flag."""
        if done is None:
            return False
        at, step_times, compute_times, stop = done
        line = pending_lines.pop(at, None)
        if line is not None:
            line["rank_step_s"] = [round(t, 6) for t in step_times]
            line["rank_compute_s"] = [round(t, 6) for t in compute_times]
            mfile.write(json.dumps(line) + "\n")
            mfile.flush()
        return stop

    progress = report.Progress(cfg, start, rank)
    t_start = time.perf_counter()
    totals = {"bytes_sent": 0, "bytes_received": 0, "dense_bytes": 0, "skipped": engine.skipped_steps}
    last_res = None
    # rank 0 logs; the others write the same lines nowhere (one code path for every rank)
    with open(metrics_path if rank == 0 else os.devnull, "a", encoding="utf-8") as mfile:
        for step in range(start, cfg.train.steps):
            progress_at["step"] = step
            t_step = time.perf_counter()
            model.train()
            batch = task.batch(sampler.indices(step))
            if device.type != "cpu" and hasattr(batch, "to"):
                batch = batch.to(device)
            losses = task.losses(engine.model, batch)  # DDP's forward runs through its wrapper
            losses = {k: losses[k] for k in objectives}
            forward_s = time.perf_counter() - t_step
            for group in optimizer.param_groups:
                group["lr"] = cfg.optimizer.lr * lr_factor(cfg, step)
            res = engine.step(losses, epoch=step / sampler.steps_per_epoch)
            last_res = res
            if not first_losses:
                first_losses = dict(res.losses)
            for k in ("bytes_sent", "bytes_received", "dense_bytes"):
                totals[k] += getattr(res, k)
            # every rank's step time and local compute time, and the stop flag of SIGTERM: the
            # reduction runs one step behind (faults.StepControl), so is this step's log line
            step_s = time.perf_counter() - t_step
            if rank == 0 and (step % cfg.logging.every == 0 or step == cfg.train.steps - 1 or res.probed):
                pending_lines[step] = report.metrics_line(res, step)
            stop = write_lines(
                control.push(
                    step,
                    step_s,
                    faults.compute_time(forward_s, res.timings),
                    bool(preemption is not None and preemption.requested),
                )
            )
            if cfg.logging.eval_every and (step + 1) % cfg.logging.eval_every == 0 and rank == 0:
                model.eval()
                with torch.no_grad():
                    ev = task.evaluate(model)
                mfile.write(json.dumps({"step": step, "eval": ev}) + "\n")
            progress.update(step, res)
            if (
                stop or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)
            ) and step + 1 < cfg.train.steps:
                # a checkpoint covers the log lines of the steps it holds
                stop = write_lines(control.flush()) or stop
            if stop and step + 1 < cfg.train.steps:
                path = save()
                progress.close()
                raise faults.Preempted(step, path)
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.train.steps:
                save()
        write_lines(control.flush())
    progress.close()
    elapsed = time.perf_counter() - t_start
    save()
    totals["skipped"] = engine.skipped_steps
    # bytes are per rank; the summary reports this run's totals summed over ranks
    counts = torch.tensor([totals["bytes_sent"], totals["bytes_received"], totals["dense_bytes"]], dtype=torch.float64)
    if world > 1:
        transport.all_reduce_(counts, "sum")
    summary = None
    if rank == 0:
        summary = report.write_summary(
            run_dir, cfg, task, model, engine, objectives, first_losses, last_res, counts, start, elapsed
        )
    # Nobody tears the group down while rank 0 still evaluates: leaving together avoids
    # a gloo peer vanishing under in-flight work.
    transport.barrier()
    return summary
