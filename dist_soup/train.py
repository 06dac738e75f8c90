"""One rank of a training run: config -> task, model, engine -> steps -> run dir.

The process group comes from the launcher: ``torchrun`` (or ``--nproc``, which sets the same
variables) for torch.distributed, ``mpirun`` for mpi4py, nothing for a single process. Sampling
is a pure function of (seed, epoch, rank, step), so a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from . import checkpoint, config as config_mod, faults, resize, tasks
from .config import Config, ConfigError
from .ddp_baseline import DDPBaseline
from .engine import SoupEngine
from .moo.recipe import Recipe, Schedule


# --- process group ---------------------------------------------------------------------------
def launcher_env() -> str:
    """"torch" under torchrun / --nproc, "mpi" under mpirun, "local" otherwise."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return "torch"
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return "mpi"
    return "local"


def init_distributed(timeout_s: float | None = None) -> tuple[str | None, int, int]:
    """(transport name, rank, world size) after joining the launcher's process group.

    ``timeout_s`` (``train.timeout_s``) bounds every collective and store wait of the group.
    """
    kind = launcher_env()
    if kind == "torch":
        import torch.distributed as dist
        from datetime import timedelta

        if not dist.is_initialized():
            timeout_s = float(timeout_s or config_mod.TrainConfig.timeout_s)
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("DIST_SOUP_BACKEND", "") != "gloo" else "gloo"
            dist.init_process_group(backend=backend, store=_attempt_store(timeout_s), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
        return "torch", dist.get_rank(), dist.get_world_size()
    if kind == "mpi":
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError("running under mpirun needs mpi4py: pip install 'dist_soup[mpi]'") from None
        return "mpi", MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return None, 0, 1


def _device(kind: str | None) -> torch.device:
    """cuda:LOCAL_RANK under NCCL, the CPU otherwise."""
    import torch.distributed as dist

    if kind == "torch" and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


_PEERS: "faults.Peers | None" = None
_GENERATION: int | None = None  # which start of the job's process group this is (1, 2, ...)


def _attempt_store(timeout_s: float):
    """The launcher's rendezvous store, with keys private to this attempt of the job.

    After a failure torchrun restarts every worker against the same store, which still holds
    the keys (gloo addresses) of the dead attempt. ``TORCHELASTIC_RESTART_COUNT`` does not name
    an attempt (each agent counts only its own failures: the agents of healthy nodes restart at
    a lower count), so the ranks agree on a fresh generation number instead
    (:func:`dist_soup.faults.generation_store`).
    """
    import torch.distributed as dist
    from datetime import timedelta

    global _PEERS, _GENERATION
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, world, is_master=not agent_store and rank == 0,
                          timeout=timedelta(seconds=timeout_s), multi_tenant=not agent_store)
    prefixed, _GENERATION = faults.generation_store(store, rank, world, timeout_s)
    _PEERS = faults.Peers(prefixed, rank, world, (addr, port))
    return prefixed


def shutdown_distributed(kind: str | None) -> None:
    if kind == "torch":
        import gc

        import torch.distributed as dist

        # Collect dropped exchanges (and the collective handles they held) while the
        # interpreter is whole: gloo work freed during interpreter shutdown can abort.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


# --- sampling --------------------------------------------------------------------------------
class ShardedSampler:
    """Seeded permutation per epoch, rank r takes positions r, r+P, ...; equal shard sizes."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        per_rank = size // world_size
        self.steps_per_epoch = per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {batch_size} examples per rank x {world_size} ranks exceeds the "
                f"task's {size} training examples; use a smaller batch_size"
            )
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.size, generator=gen)
            self._perm = perm[self.rank : self.world_size * (self.size // self.world_size) : self.world_size]
            self._epoch = epoch
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


# --- building blocks -------------------------------------------------------------------------
def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(cfg: Config, step: int) -> float:
    """The learning rate of ``step`` over ``optimizer.lr``: warm-up, then the schedule.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    import math

    o, total = cfg.optimizer, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def build_recipe(cfg: Config, objectives: tuple[str, ...], groups: dict, steps_per_epoch: int | None = None) -> Recipe:
    """The config's recipe, told the run length (``steps_per_epoch``: the engine's) that penalty
    schedules in steps or fractions of the run need."""
    r = cfg.recipe
    if r.kind == "custom":
        recipe = Recipe.from_levels(r.levels)
    else:
        from .moo.recipe import build_recipe as build

        recipe = build(r.kind, objectives, groups, solver=cfg.solver.name, solver_options=cfg.solver.options,
                       order=r.order, eta=Schedule.from_spec(vars(r.eta)))
    recipe.set_run_length(steps_per_epoch=steps_per_epoch, total_steps=cfg.train.steps)
    return recipe


def objectives_of(cfg: Config, task) -> tuple[str, ...]:
    if cfg.task.objectives is None:
        return tuple(task.objectives)
    unknown = [k for k in cfg.task.objectives if k not in task.objectives]
    if unknown or not cfg.task.objectives:
        raise ConfigError(f"task.objectives: {unknown or '[]'} not allowed; the task {task.name!r} has {list(task.objectives)}")
    return tuple(cfg.task.objectives)


def param_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def agree_on_config(transport, cfg: Config) -> None:
    """All ranks must run the same resolved config: compare its digest (tensors, no pickle)."""
    if transport.world_size == 1:
        return
    digest = bytes.fromhex(config_mod.fingerprint(cfg))[:8]
    word = int.from_bytes(digest, "little", signed=True)
    hi = torch.tensor([word], dtype=torch.int64)
    lo = torch.tensor([-word], dtype=torch.int64)
    transport.all_reduce_(hi, "max")
    transport.all_reduce_(lo, "max")
    if hi.item() != word or -lo.item() != word:
        raise ConfigError(
            f"rank {transport.rank}: the ranks of this run have different configs (fingerprint "
            f"{config_mod.fingerprint(cfg)[:16]} here); start every rank with the same config and --set overrides"
        )


# --- the run ---------------------------------------------------------------------------------
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
            kind, rank, world = init_distributed(cfg.train.timeout_s)
        except Exception as exc:
            if not faults.is_comm_error(exc):
                raise
            faults.warn(f"[dist_soup] rank {os.environ.get('RANK', '?')}: could not join the process group: "
                        f"{faults._first_line(exc)}")
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
            msg = _PEERS.diagnose(exc, progress["step"], stop=lambda: preemption.requested) if _PEERS else \
                f"[dist_soup] rank {rank}: communication failed: {faults._first_line(exc)}"
            try:
                last = checkpoint.latest(run_dir) if (Path(run_dir) / checkpoint.SUBDIR / "latest").is_file() else None
            except ValueError:
                last = None
            faults.warn(msg + (f" The run dir keeps {last.name}; rerun with --resume once the fault is fixed."
                               if last else " No checkpoint was written yet."))
            # Leave now: tearing down a process group whose peers are gone can block (gloo
            # pairs, store requests to an unreachable host), and the launcher is waiting.
            sys.stdout.flush()
            os._exit(faults.EXIT_PEER_LOST)
        finally:
            if not broken:
                shutdown_distributed(kind)


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, rank: int) -> Path | None:
    """Check the run dir against this config; the checkpoint to resume from, or None."""
    cfg_file = run_dir / "config.yaml"
    last = checkpoint.latest(run_dir) if (run_dir / checkpoint.SUBDIR).exists() else None
    if cfg_file.exists():
        try:
            old = config_mod.from_dict(yaml.safe_load(cfg_file.read_text()))
        except Exception as exc:
            raise ConfigError(f"run dir {str(run_dir)!r} holds an unreadable config.yaml ({exc}); use another --run-dir") from None
        same = config_mod.fingerprint(_without_steps(old)) == config_mod.fingerprint(_without_steps(cfg))
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


def _without_steps(cfg: Config) -> Config:
    """The config minus what may change on resume (the total number of steps)."""
    import copy

    c = copy.deepcopy(cfg)
    c.train.steps = 0
    c.train.timeout_s = 0.0
    return c


def _run(cfg: Config, run_dir: Path, resume: bool, kind, rank: int, world: int, log,
         preemption: "faults.Preemption | None" = None, progress_at: dict | None = None) -> dict | None:
    progress_at = {} if progress_at is None else progress_at
    torch.manual_seed(cfg.seed)
    task = tasks.build(cfg.task.name, **cfg.task.options)
    objectives = objectives_of(cfg, task)
    groups = {g: tuple(k for k in ks if k in objectives) for g, ks in task.groups.items()}
    groups = {g: ks for g, ks in groups.items() if ks}
    device = _device(kind)
    model = task.build_model(cfg.seed).to(device)
    optimizer = build_optimizer(cfg, model)
    sampler = ShardedSampler(task.train_size(), cfg.train.batch_size, rank, world, cfg.seed)
    if cfg.train.engine == "ddp":  # the torch DDP baseline on the same task, data and optimizer
        engine = DDPBaseline(model, optimizer, objectives, cfg.ddp, nonfinite=cfg.train.nonfinite, seed=cfg.seed,
                             find_unused_parameters=len(objectives) < len(task.objectives))
    else:
        engine = SoupEngine(model, optimizer, objectives, task.shared,
                            build_recipe(cfg, objectives, groups, sampler.steps_per_epoch),
                            steps_per_epoch=sampler.steps_per_epoch, transport=kind, **config_mod.engine_options(cfg))
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
            shared, mine, old_world = resize.load_resized(restore, rank, world, mode=cfg.compression.mode, seed=cfg.seed)
            if rank == 0:
                log(f"[dist_soup] resizing: checkpoint of {old_world} ranks resumed on {world} "
                    "(each rank holds the mean of the old ranks' residues)")
        model.load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
        engine.load_state_dict({**shared["engine"], **mine["engine"]})
        torch.set_rng_state(mine["rng"])
        start = int(shared["step"])
        first_losses = dict(shared.get("first_losses", {}))
        if rank == 0:
            gen = f" (process group generation {_GENERATION})" if _GENERATION else ""
            log(f"[dist_soup] resumed from {restore} at step {start}{gen}")
    if rank == 0:
        checkpoint.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and restore is None and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in a run dir without checkpoints starts a fresh log
    elif rank == 0 and restore is not None and metrics_path.exists():
        _truncate_metrics(metrics_path, start)

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
        return checkpoint.save(run_dir, engine.step_count, rank, shared_state if rank == 0 else None, mine,
                               transport.barrier, keep=cfg.checkpoint.keep, all_ok=all_ok)

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

    progress = _Progress(cfg, start, rank)
    t_start = time.perf_counter()
    totals = {"bytes_sent": 0, "bytes_received": 0, "dense_bytes": 0, "skipped": engine.skipped_steps}
    last_res = None
    with open(metrics_path, "a", encoding="utf-8") if rank == 0 else _Null() as mfile:
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
                pending_lines[step] = _metrics_line(res, step)
            stop = write_lines(control.push(step, step_s, faults.compute_time(forward_s, res.timings),
                                            bool(preemption is not None and preemption.requested)))
            if cfg.logging.eval_every and (step + 1) % cfg.logging.eval_every == 0 and rank == 0:
                model.eval()
                with torch.no_grad():
                    ev = task.evaluate(model)
                mfile.write(json.dumps({"step": step, "eval": ev}) + "\n")
            progress.update(step, res)
            if (stop or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)) and step + 1 < cfg.train.steps:
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
        summary = _write_summary(run_dir, cfg, task, model, engine, objectives, first_losses, last_res, counts, start, elapsed)
    # Nobody tears the group down while rank 0 still evaluates: leaving together avoids
    # a gloo peer vanishing under in-flight work.
    transport.barrier()
    return summary


def _write_summary(run_dir, cfg, task, model, engine, objectives, first_losses, last_res, counts, start, elapsed) -> dict:
    """Evaluate the final model (rank 0) and write summary.json."""
    model.eval()
    with torch.no_grad():
        evaluation = task.evaluate(model)
    steps_done = cfg.train.steps - start
    summary = {
        "steps": engine.step_count,
        "world_size": engine.world_size,
        "task": task.name,
        "objectives": {
            k: {
                "first_loss": first_losses.get(k),
                "final_loss": last_res.losses[k] if last_res else None,
                "metric": task.metrics[k].name,
                "value": evaluation[k],
                "higher_is_better": task.metrics[k].higher_is_better,
            }
            for k in objectives
        },
        "comm": {
            "bytes_sent": int(counts[0]),
            "bytes_received": int(counts[1]),
            "dense_bytes": int(counts[2]),
            "ratio": float(counts[2] / counts[0]) if counts[0] > 0 else None,
        },
        "delta_m": _delta_m(task, evaluation, objectives),
        "skipped_steps": engine.skipped_steps,
        "selected": engine.selected,
        "weights": dict(zip(objectives, engine.w.tolist())),
        "param_sha256": param_sha256(model),
        "config_sha256": config_mod.fingerprint(cfg),
        "engine": cfg.train.engine,
        "time_s": elapsed,
        "steps_per_s": steps_done / elapsed if elapsed > 0 else None,
    }
    checkpoint.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _delta_m(task, evaluation: dict, objectives: tuple[str, ...]) -> float | None:
    """Delta_m% against the task's stored single-task baselines, when it has them."""
    baselines = getattr(task, "baselines", None) or {}
    if len(objectives) < 2 or any(k not in baselines for k in objectives):
        return None
    return tasks.delta_m(evaluation, baselines, task, objectives)


def _metrics_line(res, step: int) -> dict:
    return {
        "step": step,
        "losses": res.losses,
        "weights": res.weights,
        "selected": res.selected,
        "solved": res.solved,
        "probed": res.probed,
        "skipped": res.skipped,
        "bytes_sent": res.bytes_sent,
        "bytes_received": res.bytes_received,
        "dense_bytes": res.dense_bytes,
        "timings": {k: round(v, 6) for k, v in res.timings.items()},
    }


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will be redone)."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", -1) < start:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    checkpoint.atomic_write_text(path, "".join(l + "\n" for l in keep))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        return 0

    def flush(self):
        return None


class _Progress:
    """tqdm bar on rank 0 in a terminal, plain log lines otherwise."""

    def __init__(self, cfg: Config, start: int, rank: int) -> None:
        self.cfg, self.rank, self.bar = cfg, rank, None
        mode = cfg.logging.progress
        if rank != 0 or mode == "none":
            self.mode = "none"
            return
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, res) -> None:
        if self.mode == "bar":
            self.bar.update(1)
            self.bar.set_postfix({k[:8]: f"{v:.3f}" for k, v in list(res.losses.items())[:4]})
        elif self.mode == "plain" and (step % self.cfg.logging.every == 0 or step == self.cfg.train.steps - 1):
            losses = " ".join(f"{k}={v:.4f}" for k, v in res.losses.items())
            print(f"[dist_soup] step {step + 1}/{self.cfg.train.steps} {losses}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
