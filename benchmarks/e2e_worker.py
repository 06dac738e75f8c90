"""One rank of ``benchmarks/e2e_hosts.py``: trains one row's way for N steps and times every step.

Started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) with
``--spec FILE``, the JSON that ``e2e_hosts.run_row`` writes. Writes ``rankR.json`` (every step's
times and bytes, the host's eth0 counters over the steady state) into the spec's ``out_dir``.

The loop is the same for every row (as in ``dist_soup/train.py``)::

    batch = task.batch(sampler.indices(step))      # data_s
    losses = task.losses(trainer.model, batch)     # forward_s
    sent, received, dense = trainer.step(losses, step)   # step_s: backward + exchange + optimizer

``BUILDERS`` maps a row's ``kind`` to the class that builds its model, optimizer and step from the
row's config; a new way of training (e.g. DeepSpeed) is a new class registered there.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import e2e_hosts as bench  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dist_soup import builders, config, tasks  # noqa: E402
from dist_soup.process_group import init_process_group  # noqa: E402
from dist_soup.sampler import ShardedSampler  # noqa: E402


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


class Trainer:
    """What every builder provides, built in ``__init__(cfg, task, spec, rank, world)`` after the
    process group exists (``spec["options"]`` holds the row's options):

    * ``model``: what the forward runs through (a wrapper such as DDP or a DeepSpeed engine is fine),
    * ``optimizer``: its ``param_groups`` get the config's learning rate every step,
    * ``objectives``: the losses the step takes,
    * ``step(losses, step) -> (sent, received, dense)``: backward, exchange and optimizer step;
      the bytes this rank handed to (and got from) the collectives in this step, and what fp32
      would have sent,
    * ``summary()``: extras for the rank file; ``close()``: before the group is destroyed.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    objectives: tuple[str, ...]

    def summary(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class ComputeTrainer(Trainer):
    """No communication: sum of the losses, backward, optimizer step (each rank trains alone).

    ``options["sync"]``: one 8-byte all-reduce after each backward, nothing else: every rank
    then waits for the slowest each step, as any synchronous data parallelism must, so this is
    the floor such a method can reach on the machine (compute alone's ranks never wait).
    """

    def __init__(self, cfg, task, spec, rank: int, world: int) -> None:
        self.model = task.build_model(cfg.seed)
        self.optimizer = builders.build_optimizer(cfg, self.model)
        self.objectives = builders.objectives_of(cfg, task)
        self.sync = torch.zeros(1, dtype=torch.float64) if spec["options"].get("sync") else None

    def step(self, losses, step: int):
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        if self.sync is not None:
            dist.all_reduce(self.sync)
        self.optimizer.step()
        return (8, 8, 0) if self.sync is not None else (0, 0, 0)


class DDPTrainer(Trainer):
    """The torch DDP baseline that ``dist-soup train`` runs under ``train.engine: ddp``
    (``dist_soup.ddp_baseline.DDPBaseline``: sum of the losses, DDP with the ``ddp`` section's
    comm hook, optimizer step), built from the row's config."""

    def __init__(self, cfg, task, spec, rank: int, world: int) -> None:
        from dist_soup.ddp_baseline import DDPBaseline

        if cfg.train.engine != "ddp":
            raise ValueError(f"row {spec['name']}: kind 'ddp' needs train.engine=ddp in the row's config")
        net = task.build_model(cfg.seed)
        self.optimizer = builders.build_optimizer(cfg, net)
        self.objectives = builders.objectives_of(cfg, task)
        self.engine = DDPBaseline(
            net,
            self.optimizer,
            self.objectives,
            cfg.ddp,
            nonfinite=cfg.train.nonfinite,
            seed=cfg.seed,
            find_unused_parameters=len(self.objectives) < len(task.objectives),
        )
        self.model = self.engine.model

    def step(self, losses, step: int):
        res = self.engine.step(losses)
        return res.bytes_sent, res.bytes_received, res.dense_bytes

    def summary(self) -> dict:
        return self.engine.summary()

    def close(self) -> None:
        self.engine.close()


class SoupTrainer(Trainer):
    """``SoupEngine`` built from the row's config the way ``dist_soup.train`` builds it;
    ``engine.step(losses)`` does the backward, exchanges and optimizer step."""

    def __init__(self, cfg, task, spec, rank: int, world: int) -> None:
        from dist_soup.engine import SoupEngine

        self.cfg = cfg
        objectives = builders.objectives_of(cfg, task)
        groups = {g: tuple(k for k in ks if k in objectives) for g, ks in task.groups.items()}
        groups = {g: ks for g, ks in groups.items() if ks}
        self.model = task.build_model(cfg.seed)
        self.optimizer = builders.build_optimizer(cfg, self.model)
        self.objectives = objectives
        self.steps_per_epoch = ShardedSampler(
            task.train_size(), cfg.train.batch_size, rank, world, cfg.seed
        ).steps_per_epoch
        self.engine = SoupEngine(
            self.model,
            self.optimizer,
            objectives,
            task.shared,
            builders.recipe_from_config(cfg, task, objectives, groups, self.steps_per_epoch),
            steps_per_epoch=self.steps_per_epoch,
            transport="torch",
            **config.engine_options(cfg),
        )
        builders.agree_on_config(self.engine.transport, cfg)
        self.timings: dict[str, list[float]] = {}
        self.solved = 0
        self.skipped = 0
        self.warmup = int(spec.get("warmup", 0))

    def step(self, losses, step: int):
        res = self.engine.step(losses, epoch=step / self.steps_per_epoch)
        if step >= self.warmup:
            self.solved += bool(res.solved)
            self.skipped += bool(res.skipped)
            for k, v in res.timings.items():
                self.timings.setdefault(k, []).append(v)
        return res.bytes_sent, res.bytes_received, res.dense_bytes

    def summary(self) -> dict:
        # each timing is the mean over the steady-state steps that have it (jacobian_s: solve steps)
        return {
            "engine_timings_ms": {k: 1e3 * sum(v) / len(v) for k, v in self.timings.items()},
            "solved_steps": self.solved,
            "skipped_steps": self.skipped,
        }

    def close(self) -> None:
        self.engine = None
        gc.collect()  # drop exchanges (and the gloo work they hold) while the interpreter is whole


class DeepSpeedTrainer(Trainer):
    """A DeepSpeed engine (ZeRO stage 0, fp32, the config's optimizer as DeepSpeed's client
    optimizer), sum of the losses as its one loss; ``engine.backward(loss); engine.step()``.
    ``options["plugin"]``: False, DeepSpeed's own gradient all-reduce; True, built by
    ``dist_soup.integrations.deepspeed.initialize`` with the row config's ``compression``, so
    the mean travels through the compressed exchange."""

    def __init__(self, cfg, task, spec, rank: int, world: int) -> None:
        import deepspeed

        from dist_soup.integrations import deepspeed as ds_soup
        from dist_soup.integrations.deepspeed_train import default_extensions_dir

        os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
        net = task.build_model(cfg.seed)
        self.optimizer = builders.build_optimizer(cfg, net)
        self.objectives = builders.objectives_of(cfg, task)
        self.dense = _param_bytes(net)
        ds = {
            "train_micro_batch_size_per_gpu": cfg.train.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 0},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        params = [p for p in net.parameters() if p.requires_grad]
        self.plugin = bool(spec["options"].get("plugin"))
        if self.plugin:
            c = config.to_dict(cfg)["compression"]
            ds[ds_soup.SECTION] = {"compression": c, "seed": cfg.seed}
            self.model, _, _, _ = ds_soup.initialize(
                model=net, model_parameters=params, optimizer=self.optimizer, config=ds
            )
        else:
            self.model, _, _, _ = deepspeed.initialize(
                model=net, model_parameters=params, optimizer=self.optimizer, config=ds
            )
        self._mark = ds_soup.stats(self.model) if self.plugin else None

    def step(self, losses, step: int):
        from dist_soup.integrations import deepspeed as ds_soup

        self.model.backward(sum(losses.values()))
        self.model.step()
        if not self.plugin:  # DeepSpeed's own all-reduce sends every fp32 gradient
            return self.dense, self.dense, self.dense
        now = ds_soup.stats(self.model)
        sent, received = (now[k] - self._mark[k] for k in ("bytes_sent", "bytes_received"))
        self._mark = now
        return sent, received, self.dense

    def close(self) -> None:
        self.model.destroy()
        self.model = None
        gc.collect()


BUILDERS: dict[str, type[Trainer]] = {
    "compute": ComputeTrainer,
    "ddp": DDPTrainer,
    "soup": SoupTrainer,
    "deepspeed": DeepSpeedTrainer,
}


def _iface_bytes(iface: str | None) -> tuple[int, int] | None:
    """(tx, rx) byte counters of ``iface`` in this network namespace, None without one."""
    if iface is None:
        return None
    base = Path("/sys/class/net") / iface / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except OSError:
        return None


def _thread_cpu() -> dict[str, list[float]]:
    """CPU seconds ``[user, sys]`` of this process's threads, summed by thread name (Linux /proc).

    Splits the row's CPU per step into the training thread (``python``: forward, backward, codecs)
    and the rest (gloo's, OpenMP's), and user time from the kernel's (``sys``: sockets, veth, page
    faults); {} where /proc has no per-thread figures."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, list[float]] = {}
    for task_dir in Path("/proc/self/task").glob("*"):
        try:
            name = (task_dir / "comm").read_text().strip()
            fields = (task_dir / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended between the listing and the read
        # fields[0] is field 3 of proc(5): utime and stime are fields 14 and 15
        acc = out.setdefault(name, [0.0, 0.0])
        acc[0] += int(fields[11]) / tick
        acc[1] += int(fields[12]) / tick
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--spec", required=True, help="the row's JSON spec (written by e2e_hosts.py)")
    args = p.parse_args(argv)
    job = json.loads(Path(args.spec).read_text())
    spec_d = dict(job["row"])
    spec = bench.RowSpec(**{**spec_d, "set": tuple(spec_d["set"])})
    steps, warmup, threads = int(job["steps"]), int(job["warmup"]), int(job["threads"])
    torch.set_num_threads(threads)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # env:// from torchrun (its agent's store); a peer that dies fails the collectives in time
    init_process_group("gloo", timeout=datetime.timedelta(seconds=float(job.get("timeout_s", 300))))

    cfg = bench.row_config(spec, steps, job["task_options"], tuple(job.get("extra_set", ())))
    torch.manual_seed(cfg.seed)
    task = tasks.build(cfg.task.name, **cfg.task.options)
    # The sampler of train.py: every row draws the same batches on the same rank.
    sampler = ShardedSampler(task.train_size(), cfg.train.batch_size, rank, world, cfg.seed)
    if spec.kind not in BUILDERS:
        raise SystemExit(f"row {spec.name}: unknown kind {spec.kind!r}; builders: {sorted(BUILDERS)}")
    trainer = BUILDERS[spec.kind](cfg, task, {**spec_d, "warmup": warmup}, rank, world)
    objectives = trainer.objectives

    records = []
    eth_start = None
    threads_start: dict[str, list[float]] = {}
    faults_start = 0
    last_losses: dict[str, float] = {}
    dist.barrier()  # start together (untimed); no barrier between steps
    for step in range(steps):
        if step == warmup and local_rank == 0:
            eth_start = _iface_bytes(job.get("iface"))
        if step == warmup:
            threads_start, faults_start = _thread_cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0, c0 = time.perf_counter(), time.process_time()
        batch = task.batch(sampler.indices(step))
        t1 = time.perf_counter()
        losses = task.losses(trainer.model, batch)
        losses = {k: losses[k] for k in objectives}
        for group in trainer.optimizer.param_groups:
            group["lr"] = cfg.optimizer.lr * builders.lr_factor(cfg, step)
        t2 = time.perf_counter()
        sent, received, dense = trainer.step(losses, step)
        t3, c3 = time.perf_counter(), time.process_time()
        records.append(
            {
                "step": step,
                "total_s": t3 - t0,
                "data_s": t1 - t0,
                "forward_s": t2 - t1,
                "step_s": t3 - t2,
                "cpu_s": c3 - c0,  # this process's CPU, every thread (torch's, gloo's, DeepSpeed's)
                "sent": int(sent),
                "received": int(received),
                "dense": int(dense),
            }
        )
        if step == steps - 1:
            last_losses = {k: float(v.detach()) for k, v in losses.items()}
    threads_end, window = _thread_cpu(), max(steps - warmup, 1)
    thread_cpu_ms = {  # per steady-state step, [user, sys]; a thread started since has no start
        name: [1e3 * (now - then) / window for now, then in zip(end, threads_start.get(name, (0.0, 0.0)))]
        for name, end in threads_end.items()
    }
    eth = None
    if eth_start is not None:
        end = _iface_bytes(job.get("iface"))
        eth = {"tx": end[0] - eth_start[0], "rx": end[1] - eth_start[1], "steps": steps - warmup}
    result = {
        "rank": rank,
        "world": world,
        "local_rank": local_rank,
        "kind": spec.kind,
        "row": spec.name,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "steps": records,
        "eth0": eth,
        "thread_cpu_ms": thread_cpu_ms,
        # page faults per steady-state step: memory the allocator mapped anew (each costs sys time)
        "minor_faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start) / window,
        "final_losses": last_losses,
        **trainer.summary(),
    }
    out = Path(job["out_dir"]) / f"rank{rank}.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
    trainer.close()
    dist.barrier()  # leave together: no gloo peer vanishes under in-flight work
    gc.collect()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
