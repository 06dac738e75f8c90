"""End to end: ms per training step across network-namespace hosts, every way of training at once.

One invocation brings up ``--hosts`` test hosts (``launch/netns_hosts.sh``, each host's link capped
at ``--rate`` by ``tc tbf``), runs every row of ``ROWS`` as its own torchrun job across them
(``--nproc-per-node`` ranks per host, static rendezvous on host 0, gloo on ``eth0``), removes the
hosts (also after a failure or Ctrl-C) and prints one table, written next to it as JSON and
Markdown (``--out``)::

    python benchmarks/e2e_hosts.py --rate 1gbit                  # every row, 2 hosts x 1 rank
    python benchmarks/e2e_hosts.py --rate 100mbit --rows ddp_fp32,ew_qsgd4
    python benchmarks/e2e_hosts.py --rate uncapped --hosts 2 --nproc-per-node 2
    python benchmarks/e2e_hosts.py --quick                       # tiny model, few steps: a smoke run
    python benchmarks/e2e_hosts.py --list                        # the rows and their configs

Every row trains the same task, model, sampler and optimizer (``msp_synth`` with ``languages=2
hidden=512 layers=4``, Adam lr 3e-3, 16 examples per rank per step, ``train.py``'s
``ShardedSampler``) in the same loop (``benchmarks/e2e_worker.py``): batch, forward and losses,
then the row's backward + exchange + optimizer step. The dist_soup rows are configs built by the
project's own config code (a YAML file and/or ``--set``-style overrides, ``dist_soup.config``)
and the ``SoupEngine`` that ``train.py`` builds from a config; the torch rows use
``DistributedDataParallel`` with torch's own comm hooks.

Figures: each rank times every step itself (``time.perf_counter`` around batch + forward +
backward/exchange + optimizer step; no barrier between steps). The table shows rank 0's median
and mean over the steady-state steps ``[--warmup, --steps)`` (default 20-80). ``sent MB`` is the
payload one rank hands to the collectives per step (the engine's ``StepResult.bytes_sent``; for
DDP the bucket bytes, or what torch's hook passes to ``all_reduce``); ``eth0 MB`` is what host 0's
interface really sent per step (TCP payload of every rank on the host, from
``/sys/class/net/eth0/statistics``). ``vs DDP fp32`` is DDP fp32's ms over the row's (a speed-up);
``vs compute`` the row's ms over compute alone's (1.00x: all communication hidden).

Compute alone runs the same processes (one per rank slot, all at once, so every host is as busy
as in the other rows) and the same loop with no collective between the first and the last step:
a start barrier, then sum of losses, backward and Adam alone on each rank.

A failed host ends its row at once (the others are stopped, the row shows the error and the
log tails); SIGTERM or Ctrl-C stops the run, removes the hosts and reports the rows done.

Threads: each rank gets ``--threads`` torch/OpenMP threads, by default its share of the machine's
cores (``cores // (hosts * nproc_per_node)``, at least 1), so that every host is busy at once as
in a real run (on the 2-core dev VM: one process per host, one thread each).

Rounds: this VM's speed drifts by 10-25% within minutes (compute alone measured 224-285 ms
within an hour), more than the differences between the compressed rows. ``--rounds N`` runs the
whole list of rows N times, one round after the other, so every row is measured N times in
conditions close to the other rows of its round. A row's ratios (``vs compute``, ``vs DDP fp32``)
are formed within each round and the table shows the median over the rounds with their range;
its ms/step is the median of the rounds' medians::

    python benchmarks/e2e_hosts.py --rate 1gbit --rows compute,ddp_powersgd4,ew_qsgd4 --rounds 3

Adding rows: append a ``RowSpec`` to ``ROWS``. ``kind`` picks the worker's builder
(``e2e_worker.BUILDERS``: ``compute``, ``ddp``, ``soup``, ``deepspeed``); a new way of training is a
new builder there plus rows here.

Needs root and iproute2 for the namespaces; ``--loopback`` runs the same jobs over 127.0.0.1
instead (no link cap), e.g. where namespaces cannot be made.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETNS_SCRIPT = ROOT / "launch" / "netns_hosts.sh"
WORKER = HERE / "e2e_worker.py"
sys.path.insert(0, str(ROOT))  # dist_soup from this checkout, also without an installed package


# ------------------------------------------------------------------------------------ the rows
@dataclass(frozen=True)
class RowSpec:
    """One way of training, measured as one torchrun job across the hosts.

    ``kind``: the worker's builder (``e2e_worker.BUILDERS``). ``config``: a YAML file (relative to
    the repository) the row's config starts from, None for the common base alone. ``set``:
    ``--set``-style ``key=value`` overrides applied after the common ones (``COMMON``).
    ``options``: what the builder takes besides the config (e.g. DeepSpeed's plugin switch).
    ``common``: False when ``config`` is complete by itself (a sweep cell's resolved config,
    ``benchmarks/bandwidth_accuracy.py``): then neither ``COMMON`` nor the harness's task
    options apply, only ``train.steps`` and ``set``.
    """

    name: str
    label: str
    kind: str
    config: str | None = None
    set: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    common: bool = True


# Every row's config: the task, model, batch and optimizer of the measurement. {steps} and the
# task options are filled in by ``row_config``.
COMMON: tuple[str, ...] = (
    "task.name=msp_synth",
    "optimizer.name=adam",
    "optimizer.lr=0.003",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",
    "train.batch_size=16",
    "checkpoint.every=0",
    "logging.progress=none",
    "seed=0",
)
# --malloc-keep: glibc keeps freed memory instead of handing it back and page-faulting it in
# again on the next step (read by each process at its start; every row gets the same).
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
TASK_OPTIONS = {"languages": 2, "hidden": 512, "layers": 4}
QUICK_TASK_OPTIONS = {"languages": 2, "hidden": 64, "layers": 2, "n_train": 1200, "n_test": 100}

# dist_soup `ew` rows: one level, equal weights, every shared tensor (no selection, no probe).
_EW = ("recipe.kind=vs", "solver.name=ew", "selection.rule=all")
# torch DDP rows: dist_soup.ddp_baseline, the step `dist-soup train` runs with train.engine ddp.
_DDP = ("train.engine=ddp",)


def _codec(name: str, options: str = "{}") -> tuple[str, ...]:
    """The same codec for the Jacobian rows and the update."""
    return (
        f"compression.jacobian.name={name}",
        f"compression.jacobian.options={options}",
        f"compression.update.name={name}",
        f"compression.update.options={options}",
    )


ROWS: list[RowSpec] = [
    RowSpec("compute", "compute alone (one process per rank slot, no communication)", "compute"),
    RowSpec(
        "compute_sync",
        "compute + one 8-byte all-reduce per step (the floor of synchronous data parallelism)",
        "compute",
        options={"sync": True},
    ),
    RowSpec("ddp_fp32", "torch DDP fp32, sum of losses", "ddp", set=_DDP),
    RowSpec("ddp_fp16", "torch DDP + fp16_compress_hook", "ddp", set=_DDP + ("ddp.hook=fp16",)),
    # One DDP bucket for PowerSGD: on gloo, torch's powerSGD_hook issues all-reduces from future
    # callbacks that race the next bucket's hook, and the ranks' collectives then pair up wrongly
    # (a size-mismatch abort or a hang here; pytorch/pytorch#58467). Its payload is tiny, so the
    # lost overlap costs it a few ms of wire.
    RowSpec(
        "ddp_powersgd1",
        "torch DDP + PowerSGD rank 1 (one bucket)",
        "ddp",
        set=_DDP + ("ddp.hook=powersgd", "ddp.powersgd_rank=1", "ddp.powersgd_start=2", "ddp.bucket_mb=1000"),
    ),
    RowSpec(
        "ddp_powersgd4",
        "torch DDP + PowerSGD rank 4 (one bucket)",
        "ddp",
        set=_DDP + ("ddp.hook=powersgd", "ddp.powersgd_rank=4", "ddp.powersgd_start=2", "ddp.bucket_mb=1000"),
    ),
    RowSpec(
        "ew_identity",
        "dist_soup ew, identity, allreduce",
        "soup",
        set=_EW + _codec("identity") + ("compression.mode=allreduce", "train.solve_every=100000"),
    ),
    RowSpec(
        "ew_fp16",
        "dist_soup ew, fp16, allreduce",
        "soup",
        set=_EW + _codec("fp16") + ("compression.mode=allreduce", "train.solve_every=100000"),
    ),
    RowSpec(
        "ew_qsgd4",
        "dist_soup ew, QSGD 4-bit, allgather, solve_every 100000",
        "soup",
        set=_EW + _codec("qsgd", "{bits: 4}") + ("compression.mode=allgather", "train.solve_every=100000"),
    ),
    RowSpec(
        "ew_qsgd4_solve2",
        "dist_soup ew, QSGD 4-bit, allgather, solve_every 2",
        "soup",
        set=_EW + _codec("qsgd", "{bits: 4}") + ("compression.mode=allgather", "train.solve_every=2"),
    ),
    RowSpec(
        "quickstart_solve2",
        "quickstart recipe (vm, MGDA momentum 0.9, threshold), QSGD 4-bit, solve_every 2",
        "soup",
        config="configs/quickstart.yaml",
        set=("train.solve_every=2",),
    ),
    RowSpec(
        "quickstart_solve25",
        "quickstart recipe (vm, MGDA momentum 0.9, threshold), QSGD 4-bit, solve_every 25",
        "soup",
        config="configs/quickstart.yaml",
        set=("train.solve_every=25",),
    ),
    RowSpec(
        "ds_allreduce",
        "DeepSpeed ZeRO 0 fp32, its own all-reduce, sum of losses",
        "deepspeed",
        options={"plugin": False},
    ),
    RowSpec(
        "ds_soup_qsgd4",
        "DeepSpeed + dist_soup plugin, QSGD 4-bit, allgather, sum of losses",
        "deepspeed",
        set=_codec("qsgd", "{bits: 4}") + ("compression.mode=allgather",),
        options={"plugin": True},
    ),
]
BASELINE_ROW = "ddp_fp32"
COMPUTE_ROW = "compute"


def row_config(spec: RowSpec, steps: int, task_options: dict, extra: tuple[str, ...] = ()):
    """The validated ``dist_soup.config.Config`` of ``spec``: file, common overrides, the row's own.

    Raises ``dist_soup.config.ConfigError`` for a config that ``train.py`` would refuse.
    """
    from dist_soup import config as config_mod

    common = [*COMMON, f"task.options={json.dumps(task_options)}"] if spec.common else []
    overrides = [*common, f"train.steps={steps}", *spec.set, *extra]
    if spec.config is not None:
        return config_mod.load(ROOT / spec.config, overrides)
    return config_mod.from_dict(config_mod.apply_overrides({}, overrides))


def select_rows(patterns: list[str] | None) -> list[RowSpec]:
    """The rows whose names match one of ``patterns`` (exact names or shell globs), in table order."""
    if not patterns:
        return list(ROWS)
    names = [r.name for r in ROWS]
    bad = [p for p in patterns if not fnmatch.filter(names, p)]
    if bad:
        raise SystemExit(f"--rows: no row matches {bad}; rows: {', '.join(names)}")
    return [r for r in ROWS if any(fnmatch.fnmatch(r.name, p) for p in patterns)]


# ----------------------------------------------------------------------------- the machine
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch_version,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "hostname": socket.gethostname(),
        "loadavg_start": list(os.getloadavg()),
    }


# ------------------------------------------------------------------------------- the hosts
class Hosts:
    """The namespace hosts (or loopback); ``down()`` is safe to call twice."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loopback = args.loopback
        self.prefix = args.prefix
        self.is_up = False
        self.link: str | None = None

    def ip(self, i: int) -> str:
        return "127.0.0.1" if self.loopback else f"{self.args.subnet}.{i + 1}"

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        return cmd if self.loopback else ["ip", "netns", "exec", f"{self.prefix}_h{i}", *cmd]

    def up(self) -> None:
        if self.loopback:
            return
        cmd = [
            "bash",
            str(NETNS_SCRIPT),
            "up",
            "--hosts",
            str(self.args.hosts),
            "--prefix",
            self.prefix,
            "--subnet",
            self.args.subnet,
        ]
        if self.args.rate not in ("uncapped", "none"):
            cmd += ["--rate", self.args.rate]
        self.is_up = True  # a partial `up` cleans itself up, but `down` is harmless
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise SystemExit(f"netns_hosts.sh up failed (rc={r.returncode}):\n{r.stdout}{r.stderr}")
        if self.args.check_mb > 0:
            r = subprocess.run(
                ["bash", str(NETNS_SCRIPT), "check", "--prefix", self.prefix, "--mb", str(self.args.check_mb)],
                capture_output=True,
                text=True,
                timeout=120,
                env=dict(os.environ, PYTHON=sys.executable),
            )
            self.link = (r.stdout.strip() or r.stderr.strip()).splitlines()[-1] if (r.stdout or r.stderr) else None

    def down(self) -> None:
        if self.loopback or not self.is_up:
            return
        subprocess.run(["bash", str(NETNS_SCRIPT), "down", "--prefix", self.prefix], capture_output=True, timeout=60)
        self.is_up = False


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_row(spec: RowSpec, idx: int, hosts: Hosts, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One torchrun job per host for ``spec``; the per-rank results the workers wrote."""
    rowdir = workdir / spec.name
    rowdir.mkdir(parents=True, exist_ok=True)
    from dist_soup.process_group import free_port

    port = free_port() if hosts.loopback else args.port + idx
    payload = {
        "row": asdict(spec),
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "task_options": args.task_options,
        "out_dir": str(rowdir),
        "extra_set": list(args.set),
        "iface": None if hosts.loopback else "eth0",  # the host's link, counted on local rank 0
    }
    spec_file = rowdir / "spec.json"
    spec_file.write_text(json.dumps(payload))
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        GLOO_SOCKET_IFNAME="lo" if hosts.loopback else "eth0",
        DIST_SOUP_BACKEND="gloo",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        TORCHELASTIC_ERROR_FILE=str(rowdir / "error.json"),
    )
    if args.eager:
        env["DIST_SOUP_COMPILE"] = "0"
    if args.malloc_keep:
        env.update(MALLOC_KEEP)
    procs: list[tuple[subprocess.Popen, Path]] = []
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        for i in range(args.hosts):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                str(args.hosts),
                "--node-rank",
                str(i),
                "--nproc-per-node",
                str(args.nproc_per_node),
                "--rdzv-backend",
                "static",
                "--master-addr",
                hosts.ip(0),
                "--master-port",
                str(port),
                "--local-addr",
                hosts.ip(i),
                "--max-restarts",
                "0",
                "--monitor-interval",
                "0.5",
                str(WORKER),
                "--spec",
                str(spec_file),
            ]
            log = rowdir / f"host{i}.log"
            with open(log, "w") as fh:
                procs.append(
                    (
                        subprocess.Popen(
                            hosts.wrap(i, cmd),
                            env=env,
                            cwd=ROOT,
                            stdout=fh,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        ),
                        log,
                    )
                )
        # Watch every host at once: the first one to fail (or the deadline) ends the row, since
        # the others would wait in a collective for a peer that is gone.
        deadline = time.monotonic() + args.row_timeout
        failed = []
        while not failed and [p.poll() for p, _ in procs].count(None):
            failed = [(i, p.returncode, log) for i, (p, log) in enumerate(procs) if p.returncode not in (None, 0)]
            if not failed and time.monotonic() > deadline:
                failed = [
                    (i, f"no exit within --row-timeout {args.row_timeout:g} s", log)
                    for i, (p, log) in enumerate(procs)
                    if p.poll() is None
                ]
            time.sleep(0.2)
        failed = failed or [(i, p.returncode, log) for i, (p, log) in enumerate(procs) if p.returncode != 0]
    finally:
        for p, _ in procs:
            _kill(p)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {
        "wall_s": wall,
        "loadavg_before": list(load0),
        "loadavg_after": list(os.getloadavg()),
        "ranks": [],
        "error": None,
    }
    world = args.hosts * args.nproc_per_node
    for r in range(world):
        f = rowdir / f"rank{r}.json"
        if f.exists():
            out["ranks"].append(json.loads(f.read_text()))
    if failed or len(out["ranks"]) != world:
        if failed:
            out["error"] = "; ".join(f"host {i}: {rc if isinstance(rc, str) else f'exit {rc}'}" for i, rc, _ in failed)
        else:
            out["error"] = f"only {len(out['ranks'])} of {world} ranks wrote results"
        out["log_tail"] = "\n".join(f"--- host {i} ({log.name})\n{_tail(log)}" for i, (_, log) in enumerate(procs))
    return out


def _kill(p: subprocess.Popen) -> None:
    """Ends one job this script started: its torchrun and the workers in its session (process
    group ``p.pid``), also when the torchrun itself has already gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # nothing of that session is left
        try:
            p.wait(timeout=10)
            if sig == signal.SIGTERM:
                time.sleep(0.5)  # let the workers of a torchrun that exited at once go too
        except subprocess.TimeoutExpired:
            continue
    p.poll()


# ------------------------------------------------------------------------------- the figures
def summarize(spec: RowSpec, res: dict[str, Any], warmup: int, steps: int) -> dict[str, Any]:
    """rank 0's steady-state figures of one row (None where the row failed)."""
    row: dict[str, Any] = {
        "name": spec.name,
        "label": spec.label,
        "kind": spec.kind,
        "error": res["error"],
        "wall_s": res["wall_s"],
        "loadavg_before": res["loadavg_before"],
        "loadavg_after": res["loadavg_after"],
    }
    ranks = sorted(res["ranks"], key=lambda r: r["rank"])
    if res["error"] or not ranks:
        row["log_tail"] = res.get("log_tail", "")
        return row

    def window(rank_result: dict) -> list[dict]:
        return [s for s in rank_result["steps"] if warmup <= s["step"] < steps]

    r0 = window(ranks[0])
    ms = [1e3 * s["total_s"] for s in r0]
    row.update(
        {
            "n": len(ms),
            "ms_median": statistics.median(ms),
            "ms_mean": statistics.fmean(ms),
            "ms_min": min(ms),
            "ms_stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
            "ms_median_slowest_rank": max(statistics.median(1e3 * s["total_s"] for s in window(r)) for r in ranks),
            "split_ms": {k: 1e3 * statistics.fmean(s[k] for s in r0) for k in ("data_s", "forward_s", "step_s")},
            "cpu_ms_mean": 1e3 * statistics.fmean(s["cpu_s"] for s in r0),
            "sent_bytes": statistics.fmean(s["sent"] for s in r0),
            "received_bytes": statistics.fmean(s["received"] for s in r0),
            "dense_bytes": statistics.fmean(s["dense"] for s in r0),
            "final_losses": ranks[0].get("final_losses"),
            "engine_timings_ms": ranks[0].get("engine_timings_ms"),
            "thread_cpu_ms": ranks[0].get("thread_cpu_ms"),
            "minor_faults": ranks[0].get("minor_faults"),
            "solved_steps": ranks[0].get("solved_steps"),
            "threads": ranks[0].get("threads"),
            "world": ranks[0].get("world"),
        }
    )
    eth = ranks[0].get("eth0")
    if eth and len(r0):
        row["eth0_tx_bytes"] = eth["tx"] / eth["steps"]
        row["eth0_rx_bytes"] = eth["rx"] / eth["steps"]
    row["per_step_ms_rank0"] = [round(1e3 * s["total_s"], 3) for s in ranks[0]["steps"]]
    return row


def _ratios(rows: list[dict]) -> None:
    by = {r["name"]: r for r in rows if r.get("ms_median")}
    base, comp = by.get(BASELINE_ROW), by.get(COMPUTE_ROW)
    for r in rows:
        if not r.get("ms_median"):
            continue
        r["speedup_vs_ddp_fp32"] = base["ms_median"] / r["ms_median"] if base else None
        r["x_compute"] = r["ms_median"] / comp["ms_median"] if comp else None
        r["fewer_bytes_vs_ddp_fp32"] = base["sent_bytes"] / r["sent_bytes"] if base and r["sent_bytes"] > 0 else None


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per spec from ``rounds`` (each the rows of one round, in the same order, with
    their ratios formed within the round by :func:`_ratios`): a row failed in any round shows
    that round's failure; otherwise its figures are the last round's, with ``ms_median``,
    ``ms_mean`` and the ratios replaced by their median over the rounds, and ``rounds`` holding
    each round's values of those four."""
    if len(rounds) == 1:
        return rounds[0]
    keys = ("ms_median", "ms_mean", "x_compute", "speedup_vs_ddp_fp32")
    out = []
    for per_round in zip(*rounds):
        failed = [r for r in per_round if r.get("error") or not r.get("ms_median")]
        if failed:
            out.append(failed[0])
            continue
        row = dict(per_round[-1])
        row["rounds"] = [{k: r.get(k) for k in keys} for r in per_round]
        for k in keys:
            values = [r[k] for r in per_round if r.get(k) is not None]
            row[k] = statistics.median(values) if values else None
        out.append(row)
    return out


def _spread(row: dict, key: str, fmt: str, unit: str = "") -> str:
    """`` (lo-hi)`` of ``key`` over the rounds, or nothing for a single round."""
    values = [r[key] for r in row.get("rounds", ()) if r.get(key) is not None]
    if len(values) < 2:
        return ""
    return f" ({format(min(values), fmt)}-{format(max(values), fmt)}{unit})"


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _x(x, fmt: str) -> str:
    """A ratio as "1.23x", "-" where its reference row was not run."""
    return "-" if x is None else format(x, fmt) + "x"


def format_report(rows: list[dict], setup: dict, machine: dict) -> str:
    where = (
        f"{setup['hosts']} netns hosts, veth, {setup['rate']}"
        if not setup["loopback"]
        else f"{setup['hosts']} torchrun nodes over 127.0.0.1 (loopback, uncapped)"
    )
    lines = [
        f"## End to end: {where}, {setup['nproc_per_node']} rank(s) per host, world {setup['world']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"torch {machine['torch']}, Python {machine['python']}, kernel {machine['kernel']}; "
        f"load average {' '.join(f'{x:.2f}' for x in machine['loadavg_start'])} at start, "
        f"{' '.join(f'{x:.2f}' for x in machine['loadavg_end'])} at end.",
        f"Task: msp_synth {setup['task_options']}, Adam lr 3e-3, batch 16 per rank, "
        f"{setup['threads']} thread(s) per rank; rank 0's steps {setup['warmup']}-{setup['steps']} "
        f"(steady state); codecs {'eager' if setup['eager'] else 'as configured (compiled where available)'}"
        f"{'; glibc keeps freed memory (--malloc-keep, every row)' if setup.get('malloc_keep') else ''}.",
    ]
    if setup.get("link"):
        lines.append(f"Link: {setup['link']}")
    if setup.get("interrupted"):
        lines.append(f"Interrupted ({setup['interrupted']}): only the rows done before it are shown.")
    lines += [
        "",
        "| run | ms/step (median) | mean | CPU ms/step | vs DDP fp32 | vs compute | sent MB/step/rank "
        "| fewer bytes | eth0 MB/step (host 0) | n | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | | | | |")
            continue
        load = f"{r['loadavg_before'][0]:.2f}/{r['loadavg_after'][0]:.2f}"
        lines.append(
            f"| {r['label']} | {r['ms_median']:.1f}{_spread(r, 'ms_median', '.0f')} | {r['ms_mean']:.1f} | "
            f"{_f(r.get('cpu_ms_mean'), '.0f')} | "
            f"{_x(r.get('speedup_vs_ddp_fp32'), '.2f')}{_spread(r, 'speedup_vs_ddp_fp32', '.2f', 'x')} | "
            f"{_x(r.get('x_compute'), '.2f')}{_spread(r, 'x_compute', '.2f', 'x')} | {r['sent_bytes'] / 1e6:.3f} | "
            f"{_x(r.get('fewer_bytes_vs_ddp_fp32'), '.1f')} | "
            f"{_f(None if r.get('eth0_tx_bytes') is None else r['eth0_tx_bytes'] / 1e6, '.3f')} | {r['n']} | {load} |"
        )
    lines += [
        "",
        "vs DDP fp32: DDP fp32's median ms over the row's (higher is faster). vs compute: the row's "
        "median over compute alone's (1.00x: communication fully hidden). CPU: rank 0's process CPU per "
        "step (mean, every thread: torch, the transport, the codecs); where every core is busy, a row's "
        "CPU beyond compute alone's is time it cannot hide. sent: payload handed to the "
        "collectives per rank; fewer bytes: DDP fp32's sent over the row's. eth0: bytes host 0's "
        "interface sent per step. load: 1-minute load average before/after the row.",
    ]
    if setup.get("rounds", 1) > 1:
        lines.append(
            f"{setup['rounds']} rounds: ms/step is the median of the rounds' medians, each ratio the median "
            "of the ratios formed within each round; (lo-hi) their range over the rounds; the other "
            "columns are the last round's."
        )
    split = [r for r in rows if not r.get("error") and r.get("thread_cpu_ms")]
    if split:
        lines += [
            "",
            "Rank 0's CPU per step by thread (ms, user + sys; last round) and the page faults of memory "
            "mapped anew (per step):",
            "",
            "| run | training thread | other threads | of which sys | page faults |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in split:
            cpu = r["thread_cpu_ms"]
            main = sum(sum(v) for name, v in cpu.items() if name.startswith("python"))
            total = sum(sum(v) for v in cpu.values())
            lines.append(
                f"| {r['label']} | {main:.0f} | {total - main:.0f} | {sum(v[1] for v in cpu.values()):.0f} | "
                f"{_f(r.get('minor_faults'), '.0f')} |"
            )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the CLI
def _task_option(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option wants KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rate",
        default="1gbit",
        help="per-host link cap for tc tbf (100mbit, 1gbit, ...) or 'uncapped' (default 1gbit)",
    )
    p.add_argument("--hosts", type=int, default=2, help="namespace hosts (default 2)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per host (default 1)")
    p.add_argument("--rows", default=None, help="comma-separated row names or globs (default all; --list)")
    p.add_argument("--list", action="store_true", help="print the rows with their resolved configs and exit")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default 80; --quick 12)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="first measured step: rank 0's steps [warmup, steps) are the steady state (default 20; --quick 4)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per rank (default: cores // (hosts * nproc-per-node), at least 1)",
    )
    p.add_argument(
        "--option",
        type=_task_option,
        action="append",
        default=[],
        help="task option KEY=VALUE for every row (default languages=2 hidden=512 layers=4)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="a config override KEY=VALUE applied to every row's config after the row's own",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny model (hidden 64, layers 2), 12 steps (4 warm-up), eager codecs, no link check",
    )
    p.add_argument("--eager", action="store_true", help="DIST_SOUP_COMPILE=0: eager codec kernels (no torch.compile)")
    p.add_argument(
        "--out",
        default=None,
        help="results path without extension: writes OUT.json and OUT.md (default runs/e2e_hosts/RATE-HxN-TIMESTAMP)",
    )
    p.add_argument("--prefix", default="dsb", help="namespace prefix (default dsb)")
    p.add_argument("--subnet", default="10.202.0", help="namespace subnet, three octets (default 10.202.0)")
    p.add_argument("--port", type=int, default=29610, help="rendezvous port on host 0; the i-th row run uses PORT+i")
    p.add_argument(
        "--check-mb",
        type=int,
        default=None,
        help="MB streamed host 0 -> 1 to measure the link first (0: skip; default 100, 20 at <= 100mbit)",
    )
    p.add_argument("--row-timeout", type=float, default=900.0, help="seconds before a row is stopped (default 900)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the list of rows this many times, one round after the other; ratios are formed "
        "within a round, the table shows their median and range over the rounds (default 1)",
    )
    p.add_argument(
        "--loopback",
        action="store_true",
        help="no namespaces: every 'host' is a torchrun node on 127.0.0.1 (no cap, --rate ignored)",
    )
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="every row's processes keep freed memory (glibc MALLOC_MMAP_THRESHOLD_ / "
        "MALLOC_TRIM_THRESHOLD_): no row pays page faults for memory glibc returned and maps anew",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the per-row worker logs and rank files")
    args = p.parse_args(argv)

    args.task_options = dict(QUICK_TASK_OPTIONS if args.quick else TASK_OPTIONS)
    args.task_options.update(dict(args.option))
    if args.steps is None:
        args.steps = 12 if args.quick else 80
    if args.warmup is None:
        args.warmup = min(4 if args.quick else 20, max(0, args.steps - 1))
    if args.quick:
        args.eager = True
        if args.check_mb is None:
            args.check_mb = 0
    if args.check_mb is None:
        args.check_mb = 20 if args.rate.lower() in ("100mbit", "10mbit") else 100
    if args.loopback:
        args.rate = "uncapped"
        args.check_mb = 0
    world = args.hosts * args.nproc_per_node
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // world)
    if args.hosts < 1 or args.nproc_per_node < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--hosts, --nproc-per-node, --threads and --rounds must be positive")
    if not args.loopback and args.hosts < 2:
        p.error("namespace hosts need --hosts >= 2 (or --loopback)")
    if not 0 <= args.warmup < args.steps:
        p.error(f"need 0 <= --warmup < --steps, got warmup {args.warmup}, steps {args.steps}")
    args.row_specs = select_rows([x for x in args.rows.split(",") if x] if args.rows else None)
    return args


def _validate_configs(args: argparse.Namespace) -> None:
    """Every row's config, checked here before any process starts (as train.py would)."""
    from dist_soup.config import ConfigError

    for spec in args.row_specs:
        try:
            row_config(spec, args.steps, args.task_options, tuple(args.set))
        except ConfigError as exc:
            raise SystemExit(f"row {spec.name}: config refused: {exc}") from None


class _Stopped(BaseException):
    """SIGTERM / SIGHUP: stop the running row, remove the hosts, report the rows done."""


def run_round(rnd: int, rows: list[dict], hosts: Hosts, args: argparse.Namespace, workdir: Path) -> None:
    """Every row once, appended to ``rows`` as it finishes (so an interruption keeps them)."""
    for i, spec in enumerate(args.row_specs):
        tag = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
        print(f"[e2e] {spec.name}{tag}: {spec.label} ...", end=" ", flush=True)
        res = run_row(spec, rnd * len(args.row_specs) + i, hosts, args, workdir)
        row = summarize(spec, res, args.warmup, args.steps)
        rows.append(row)
        if row.get("error"):
            print(f"FAILED ({row['error']}) after {res['wall_s']:.0f} s\n{row.get('log_tail', '')}", flush=True)
        else:
            print(
                f"{row['ms_median']:.1f} ms/step, {row['sent_bytes'] / 1e6:.3f} MB/step/rank ({res['wall_s']:.0f} s)",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        from dist_soup import config as config_mod

        for spec in args.row_specs:
            cfg = row_config(spec, args.steps, args.task_options, tuple(args.set))
            print(f"{spec.name}: {spec.label} [{spec.kind}] {spec.options or ''}")
            if spec.kind == "soup":
                c = cfg.compression
                print(
                    f"    recipe {cfg.recipe.kind}/{cfg.solver.name}, selection {cfg.selection.rule}, "
                    f"J {c.jacobian.name}{c.jacobian.options}, U {c.update.name}{c.update.options}, mode {c.mode}, "
                    f"solve_every {cfg.train.solve_every}  (config {config_mod.fingerprint(cfg)[:12]})"
                )
            elif spec.kind == "ddp":
                d = cfg.ddp
                rank = f", rank {d.powersgd_rank}, from step {d.powersgd_start}" if d.hook == "powersgd" else ""
                print(
                    f"    hook {d.hook}{rank}, buckets of {d.bucket_mb:g} MB  "
                    f"(config {config_mod.fingerprint(cfg)[:12]})"
                )
        return 0
    if not args.loopback:
        if os.geteuid() != 0:
            raise SystemExit("namespace hosts need root (or use --loopback)")
        if shutil.which("ip") is None:
            raise SystemExit("namespace hosts need iproute2: apt-get install -y iproute2")
    _validate_configs(args)
    machine = machine_info()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "runs" / "e2e_hosts" / f"{args.rate}-{args.hosts}x{args.nproc_per_node}-{stamp}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="e2e_hosts-"))
    hosts = Hosts(args)

    def on_signal(signum, _frame):
        raise _Stopped(f"stopped by signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    rounds: list[list[dict]] = []
    interrupted: str | None = None
    try:
        hosts.up()
        if hosts.link:
            print(hosts.link, flush=True)
        for rnd in range(args.rounds):
            rounds.append([])
            run_round(rnd, rounds[-1], hosts, args, workdir)
    except (KeyboardInterrupt, _Stopped) as exc:
        interrupted = str(exc) or type(exc).__name__
        print(f"\n[e2e] interrupted ({interrupted}); the rows done so far follow", flush=True)
    finally:
        hosts.down()
        for s, h in old.items():
            signal.signal(s, h)
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[e2e] logs and rank files kept in {workdir}")
    machine["loadavg_end"] = list(os.getloadavg())
    if len(rounds) > 1 and len(rounds[-1]) < len(args.row_specs):
        rounds.pop()  # an interrupted round: report the complete ones
    for r in rounds:
        _ratios(r)
    rows = combine_rounds(rounds) if rounds else []
    setup = {
        "rounds": len(rounds),
        "rate": args.rate,
        "hosts": args.hosts,
        "nproc_per_node": args.nproc_per_node,
        "world": args.hosts * args.nproc_per_node,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "task_options": args.task_options,
        "extra_set": args.set,
        "eager": args.eager,
        "loopback": args.loopback,
        "malloc_keep": args.malloc_keep,
        "link": hosts.link,
        "quick": args.quick,
        "date": stamp,
        "rendezvous": "torchrun --rdzv-backend static, master host 0, gloo on " + ("lo" if args.loopback else "eth0"),
        "interrupted": interrupted,
    }
    report = format_report(rows, setup, machine)
    print()
    print(report, flush=True)
    md, js = Path(f"{out}.md"), Path(f"{out}.json")
    md.write_text(report + "\n")
    js.write_text(
        json.dumps(
            {"machine": machine, "setup": setup, "rows": rows, "specs": [asdict(s) for s in args.row_specs]}, indent=1
        )
        + "\n"
    )
    print(f"\n[e2e] wrote {js} and {md}", flush=True)
    if interrupted:
        return 130
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
