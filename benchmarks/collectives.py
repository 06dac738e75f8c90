"""Time and bytes of compressed collectives against fp32 all_reduce, torch's fp16 and PowerSGD hooks.

One table per world size: every row is one way of averaging the same ``--numel`` float32 values
(different on every rank) over the ranks, all measured in the same processes:

* ``fp32 all_reduce``: ``dist.all_reduce`` (SUM, then divide): the baseline of every ratio.
* ``torch fp16 hook`` and ``torch PowerSGD r=R``: torch's DDP comm hooks, called the way DDP calls
  them (``hook(state, bucket)`` on a bucket holding one (rows x cols) gradient, then ``wait()``).
* ``dist_soup <mode> <codec> (N MB pieces)``: ``dist_soup.comm.Exchange(codec, mode,
  chunk_mb=N).mean``, one row per ``--chunk-mb`` value (0: one piece); encoding and
  decoding are inside the timed call.
* ``dist_soup ddp hook``: this project's DDP hook on the same bucket path as torch's hooks,
  with the bucket cut into ``--hook-chunk-mb`` chunks (pipelined streams; see the hook's docs).

A call's time is the slowest rank's (barrier, then each rank times its call; MAX over ranks);
the table shows the median over ``n`` timed calls (``--iters``, fewer when a case would take
more than ``--case-budget`` seconds) after ``--warmup`` calls (and, for dist_soup rows, one more
first call that pays configuration agreement and kernel compilation). ``sent/rank`` is the
payload bytes one rank hands to the collectives per call (what the Exchange's byte accounting
counts; for the torch rows, the tensors given to ``all_reduce``). ``err`` is
``||mean_hat - mean|| / ||mean||`` of the last call.

Ways to run:
  python benchmarks/collectives.py                       # spawn gloo ranks on 127.0.0.1
  python benchmarks/collectives.py --quick
  torchrun --nproc-per-node 2 benchmarks/collectives.py  # one table at torchrun's world size
  python benchmarks/collectives.py --rank R --world-size W --master-addr A --master-port P
  python benchmarks/collectives.py netns --rate 1gbit    # one rank per network-namespace host
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NETNS_SCRIPT = ROOT / "launch" / "netns_hosts.sh"

# Short names on the command line -> (codec, options). Sparsifiers keep 1% of the values.
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "identity": ("identity", {}),
    "fp16": ("fp16", {}),
    "qsgd4": ("qsgd", {"bits": 4}),
    "qsgd8": ("qsgd", {"bits": 8}),
    "adacomp": ("adacomp", {}),
    "topk": ("topk", {"ratio": 0.01}),
    "randomk": ("randomk", {"ratio": 0.01}),
    "cltk": ("cltk", {"ratio": 0.01}),
}
MODES = ("allgather", "allreduce", "two_phase")
DEFAULT_CODECS = "identity,fp16,qsgd4,qsgd8,adacomp,topk,randomk,cltk"


@dataclass
class Row:
    name: str
    ms: float  # median over iterations of the slowest rank's time per call
    sent: float  # payload bytes one rank hands to the collectives per call
    received: float
    dense: float  # bytes of the fp32 input
    err: float
    split: tuple[float, float, float] | None = None  # encode / comm / decode ms per call (rank 0)
    note: str = ""
    n: int = 0  # timed calls


# ------------------------------------------------------------------------------------ helpers
def _matrix_shape(n: int) -> tuple[int, int]:
    """rows x cols == n with rows the largest divisor <= sqrt(n): PowerSGD compresses matrices."""
    for rows in range(int(math.isqrt(n)), 0, -1):
        if n % rows == 0:
            return rows, n // rows
    return 1, n


class _Bucket:
    """What a DDP comm hook sees of ``dist.GradBucket`` (one bucket holding one gradient).

    torch's hooks are plain functions over ``(state, bucket)``; calling them on this object runs
    exactly their code (compression, collectives, decompression) without DDP's backward around it.
    """

    def __init__(self, flat, shape: tuple[int, int], index: int = 0) -> None:
        self._buffer = flat
        self._shape = shape
        self._index = index
        self._param = None

    def buffer(self):
        return self._buffer

    def set_buffer(self, tensor) -> None:
        self._buffer = tensor

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return True

    def gradients(self):
        return [self._buffer.view(self._shape)]

    def parameters(self):
        import torch

        if self._param is None:
            self._param = torch.nn.Parameter(torch.empty(self._shape))
        return [self._param]


def _time_case(
    dist, torch, run: Callable[[], Any], refill: Callable[[], None], warmup: int, iters: int, budget_s: float
) -> tuple[float, Any, int]:
    """Median over the timed calls of the slowest rank's time of ``run()``, the last output and
    the number of calls made (warm-up included).

    ``warmup`` untimed calls first; then ``iters`` timed calls, fewer when the last warm-up call
    says they would take more than ``budget_s`` (at least one). Every rank takes the same
    decision: it rests on the MAX over ranks of that warm-up time.
    """
    out = None
    last = torch.zeros(1, dtype=torch.float64)
    for _ in range(warmup):
        refill()
        dist.barrier()
        t0 = time.perf_counter()
        out = run()
        last[0] = time.perf_counter() - t0
    dist.all_reduce(last, op=dist.ReduceOp.MAX)
    n = max(1, min(iters, int(budget_s / max(float(last[0]), 1e-9))))
    times = []
    for _ in range(n):
        refill()
        dist.barrier()
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist()) * 1e3, out, warmup + n


def _rel_err(torch, out, exact) -> float:
    out = out.reshape(-1).to(torch.float32)
    return float(torch.linalg.vector_norm(out - exact) / torch.linalg.vector_norm(exact).clamp_min(1e-30))


# ----------------------------------------------------------------------------- one process
def bench_rank(rank: int, world: int, init_method: str, args: argparse.Namespace) -> list[Row]:
    """Runs every case on this rank; returns the rows on rank 0 (empty list elsewhere)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from dist_soup.process_group import init_process_group

    torch.set_num_threads(args.threads)
    init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        return _bench(rank, world, args, torch, dist, default_hooks, powerSGD_hook)
    finally:
        dist.destroy_process_group()


def _bench(rank, world, args, torch, dist, default_hooks, powerSGD_hook) -> list[Row]:
    n = args.numel
    gen = torch.Generator().manual_seed(1234 + rank)
    src = torch.randn(n, generator=gen)
    exact = src.clone()
    dist.all_reduce(exact)
    exact /= world
    work = torch.empty_like(src)
    dense = 4.0 * n
    shape = _matrix_shape(n)
    rows: list[Row] = []

    def refill() -> None:
        work.copy_(src)

    def timed(run, extra_warmup: int = 0) -> tuple[float, Any, int, int]:
        """(ms, last output, timed calls, all calls)."""
        warm = args.warmup + extra_warmup
        ms, out, calls = _time_case(dist, torch, run, refill, warm, args.iters, args.case_budget)
        return ms, out, calls - warm, calls

    # fp32 all_reduce: the baseline.
    def allreduce_fp32():
        dist.all_reduce(work)
        return work.div_(world)

    ms, out, k, _ = timed(allreduce_fp32)
    rows.append(Row("fp32 all_reduce", ms, dense, dense, dense, _rel_err(torch, out, exact), n=k))

    # torch's fp16 hook, on a bucket (what DDP hands it).
    bucket = _Bucket(work, shape)

    def fp16_hook():
        bucket.set_buffer(work)
        return default_hooks.fp16_compress_hook(None, bucket).wait()

    ms, out, k, _ = timed(fp16_hook)
    rows.append(Row("torch fp16 hook", ms, dense / 2, dense / 2, dense, _rel_err(torch, out, exact), n=k))

    # torch's PowerSGD (error feedback and warm start on, as recommended). Its first
    # start_powerSGD_iter calls are plain all_reduces and the next ones allocate its state:
    # extra warm-up, so every timed call is a steady compressed one.
    start = 2  # the smallest start torch allows with error feedback / warm start
    for r in args.powersgd_ranks:
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=r,
            start_powerSGD_iter=start,
            min_compression_rate=1.0,
            use_error_feedback=True,
            warm_start=True,
            random_seed=0,
        )

        def psgd(state=state):
            bucket.set_buffer(work)
            return powerSGD_hook.powerSGD_hook(state, bucket).wait()

        ms, out, k, _ = timed(psgd, extra_warmup=start + 2)
        sent = 4.0 * r * (shape[0] + shape[1])
        rows.append(
            Row(
                f"torch PowerSGD r={r}",
                ms,
                sent,
                sent,
                dense,
                _rel_err(torch, out, exact),
                note=f"{shape[0]}x{shape[1]}",
                n=k,
            )
        )

    rows.extend(_bench_dist_soup(rank, args, torch, exact, work, shape, timed))
    return rows if rank == 0 else []


def _supports(codec: str, options: dict[str, Any], mode: str) -> str | None:
    """None when ``codec`` runs in ``mode``; otherwise why not (same answer on every rank)."""
    from dist_soup import compress

    if codec not in compress.names():
        return f"codec {codec!r} is not registered"
    if mode == "allreduce" and not getattr(compress.build(codec, **options), "summable", False):
        return "not summable, so no allreduce mode"
    return None


def _bench_dist_soup(rank, args, torch, exact, work, shape, timed) -> list[Row]:
    if not (args.codecs and args.modes) and args.hook is None:
        return []
    from dist_soup.comm import Exchange

    dense = 4.0 * work.numel()

    def measure(label: str, ex, run) -> Row:
        run()  # the stream's first call: configuration agreement, buffers, kernel compilation
        s0 = _stats(ex)
        ms, out, k, calls = timed(run)
        s1 = _stats(ex)
        d = {key: (s1[key] - s0[key]) / calls for key in s0}
        return Row(
            label,
            ms,
            d["bytes_sent"],
            d["bytes_received"],
            dense,
            _rel_err(torch, out, exact),
            split=(d["encode_s"] * 1e3, d["comm_s"] * 1e3, d["decode_s"] * 1e3),
            n=k,
        )

    rows: list[Row] = []
    for mode in args.modes:
        for short in args.codecs:
            codec, options = CODECS[short]
            why = _supports(codec, options, mode)
            if why is not None:
                if rank == 0 and args.verbose:
                    print(f"skip {mode} {short}: {why}", flush=True)
                continue
            for chunk_mb in args.chunk_mb:
                ex = Exchange(codec, mode, bucket_mb=args.bucket_mb, chunk_mb=chunk_mb or None, **options)
                name = f"bench.{short}"
                label = f"dist_soup {mode} {short}" + (f" ({chunk_mb:g} MB pieces)" if chunk_mb else " (one piece)")
                rows.append(measure(label, ex, lambda ex=ex, name=name: ex.mean(name, work)))
                if chunk_mb:
                    # The same exchange writing the mean into the caller's buffer (out=, as the
                    # engine and the DDP hook do); refilling the buffer each call is timed too.
                    ex = Exchange(codec, mode, bucket_mb=args.bucket_mb, chunk_mb=chunk_mb, **options)
                    buf = work.clone()

                    def in_place(ex=ex, buf=buf, name=name):
                        buf.copy_(work)
                        return ex.mean_many({name: buf}, out={name: buf})[name]

                    rows.append(measure(label + " in place", ex, in_place))
    if args.hook is not None:
        from dist_soup.integrations import ddp as ddp_hooks

        short, mode = args.hook
        codec, options = CODECS[short]
        if _supports(codec, options, mode) is None:
            # What register(model, codec, mode, chunk_mb=...) builds, without the DDP model around.
            chunk_mb = args.hook_chunk_mb if args.hook_chunk_mb > 0 else None
            state = ddp_hooks.DDPCommState(
                Exchange(codec, mode, bucket_mb=args.bucket_mb, chunk_mb=chunk_mb, **options)
            )
            bucket = _Bucket(work, shape)

            def hook():
                bucket.set_buffer(work)
                return ddp_hooks.compressed_mean_hook(state, bucket).wait()

            label = f"dist_soup ddp hook {mode} {short}" + (f" ({chunk_mb:g} MB chunks)" if chunk_mb else "")
            rows.append(measure(label, state.exchange, hook))
    return rows


_STATS = ("bytes_sent", "bytes_received", "encode_s", "comm_s", "decode_s")


def _stats(ex) -> dict[str, float]:
    return {k: float(getattr(ex.stats, k)) for k in _STATS}


# ------------------------------------------------------------------------------- reporting
def format_table(rows: list[Row], world: int, args: argparse.Namespace, where: str) -> str:
    base = next(r.ms for r in rows if r.name == "fp32 all_reduce")
    lines = [
        f"## {args.numel / 1e6:g}M float32, {world} ranks, {where} "
        f"(median of n timed calls after {args.warmup}+ warm-up; {args.threads} thread(s)/rank"
        f"{'; --malloc-keep' if getattr(args, 'malloc_keep', False) else ''})",
        "",
        "| method | ms/call | n | speedup vs fp32 | sent/rank MB | recv/rank MB | ratio | enc/comm/dec ms | err |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        split = "" if r.split is None else "/".join(f"{x:.0f}" for x in r.split)
        name = r.name + (f" ({r.note})" if r.note else "")
        ratio = r.dense / r.sent if r.sent > 0 else float("inf")
        lines.append(
            f"| {name} | {r.ms:.1f} | {r.n} | {base / r.ms:.2f}x | {r.sent / 1e6:.2f} | {r.received / 1e6:.2f} | "
            f"{ratio:.1f}x | {split} | {r.err:.2g} |"
        )
    return "\n".join(lines)


def _report(rows: list[Row], world: int, args: argparse.Namespace, where: str) -> None:
    print(format_table(rows, world, args, where), flush=True)
    print(flush=True)
    if args.json:
        path = Path(args.json)
        data = json.loads(path.read_text()) if path.exists() else []
        data.append({"world": world, "where": where, "numel": args.numel, "rows": [asdict(r) for r in rows]})
        path.write_text(json.dumps(data, indent=1))


# ------------------------------------------------------------------------------- launchers
def _spawned(rank: int, world: int, init_method: str, args: argparse.Namespace) -> None:
    rows = bench_rank(rank, world, init_method, args)
    if rank == 0:
        _report(rows, world, args, "gloo over 127.0.0.1 (spawned processes)")


def run_spawn(args: argparse.Namespace) -> None:
    from dist_soup.process_group import spawn_local

    for world in args.ranks:
        spawn_local(_spawned, world, "env://", args)


def run_one_rank(args: argparse.Namespace) -> None:
    """One rank of a job started elsewhere (torchrun, or netns hosts via ``netns_hosts.sh exec``)."""
    if args.rank is None:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        init = "env://"
    else:
        rank, world = args.rank, args.world_size
        init = f"tcp://{args.master_addr}:{args.master_port}"
    rows = bench_rank(rank, world, init, args)
    if rank == 0:
        _report(rows, world, args, args.where or f"gloo, master {init}")


def _passthrough(args: argparse.Namespace) -> list[str]:
    """The benchmark flags of this run, for the per-host processes."""
    out = [
        "--numel",
        str(args.numel),
        "--modes",
        ",".join(args.modes),
        "--codecs",
        ",".join(args.codecs),
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--timeout",
        str(args.timeout),
        "--bucket-mb",
        str(args.bucket_mb),
        "--case-budget",
        str(args.case_budget),
        "--powersgd-ranks",
        ",".join(map(str, args.powersgd_ranks)),
        "--hook",
        "none" if args.hook is None else ",".join(args.hook),
        "--hook-chunk-mb",
        str(args.hook_chunk_mb),
        "--chunk-mb",
        ",".join(map(str, args.chunk_mb)),
    ]
    if args.malloc_keep:
        out.append("--malloc-keep")
    if args.json:
        out += ["--json", str(Path(args.json).resolve())]
    if args.verbose:
        out.append("--verbose")
    return out


def run_netns(args: argparse.Namespace) -> int:
    """Brings up namespace hosts, runs one rank per host, prints rank 0's table, tears down."""
    if os.geteuid() != 0:
        raise SystemExit("netns mode needs root (it creates network namespaces)")
    if shutil.which("ip") is None:
        raise SystemExit("netns mode needs iproute2: apt-get install -y iproute2")
    status = 0
    for world in args.ranks:
        prefix = f"dsb{os.getpid() % 100000}"
        procs: list[subprocess.Popen] = []
        up = ["bash", str(NETNS_SCRIPT), "up", "--prefix", prefix, "--hosts", str(world)]
        if args.rate:
            up += ["--rate", args.rate]
        try:
            subprocess.run(up, check=True, stdout=subprocess.DEVNULL)
            port = 29500 + os.getpid() % 1000
            where = f"{world} netns hosts, veth, " + (f"tbf {args.rate}" if args.rate else "uncapped")
            env = dict(
                os.environ,
                GLOO_SOCKET_IFNAME="eth0",
                OMP_NUM_THREADS=str(args.threads),
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            )
            procs = []
            for r in range(world):
                cmd = [
                    "ip",
                    "netns",
                    "exec",
                    f"{prefix}_h{r}",
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--rank",
                    str(r),
                    "--world-size",
                    str(world),
                    "--master-addr",
                    "10.200.0.1",
                    "--master-port",
                    str(port),
                    "--where",
                    where,
                    *_passthrough(args),
                ]
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=env,
                        cwd=ROOT,
                        stdout=None if r == 0 else subprocess.DEVNULL,
                        stderr=None if r == 0 else subprocess.PIPE,
                    )
                )
            deadline = time.monotonic() + args.timeout + 60
            for r, p in enumerate(procs):
                try:
                    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    rc = -1
                if rc != 0:
                    status = 1
                    err = p.stderr.read().decode(errors="replace")[-2000:] if p.stderr else ""
                    print(f"rank {r} failed (rc={rc}) {err}", file=sys.stderr)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            subprocess.run(["bash", str(NETNS_SCRIPT), "down", "--prefix", prefix], stdout=subprocess.DEVNULL)
    return status


# ----------------------------------------------------------------------------------- CLI
def _csv(kind: Callable[[str], Any], allowed: tuple | None = None, what: str = ""):
    def parse(text: str) -> list:
        items = [kind(x) for x in text.split(",") if x]
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {what} {bad}; allowed: {', '.join(allowed)}")
        return items

    return parse


def _hook_arg(text: str):
    if text == "none":
        return None
    parts = text.split(",")
    if len(parts) != 2 or parts[0] not in CODECS or parts[1] not in MODES:
        raise argparse.ArgumentTypeError(
            f"--hook wants CODEC,MODE (codec in {sorted(CODECS)}, mode in {MODES}) or none; got {text!r}"
        )
    return parts


def parse_args(argv: list[str] | None = None) -> tuple[str, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "run"
    if argv and argv[0] == "netns":
        command = "netns"
        argv = argv[1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=10_000_000, help="float32 values per rank (default 10M)")
    p.add_argument(
        "--ranks", type=_csv(int), default=None, help="world sizes, comma-separated (default 2,4; netns mode: 2)"
    )
    p.add_argument("--modes", type=_csv(str, MODES, "mode"), default=list(MODES))
    p.add_argument("--codecs", type=_csv(str, tuple(CODECS), "codec"), default=DEFAULT_CODECS.split(","))
    p.add_argument("--iters", type=int, default=5, help="timed calls per case, at most (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case first (plus one for streams)")
    p.add_argument(
        "--case-budget",
        type=float,
        default=6.0,
        help="seconds of timed calls per case: slow cases get fewer calls (at least 1)",
    )
    p.add_argument(
        "--quick", action="store_true", help="1M values, 2 ranks, 3 iters, modes allgather,allreduce: a smoke run"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="Exchange bucket size")
    p.add_argument(
        "--chunk-mb",
        type=_csv(float),
        default=[4.0],
        help="Exchange piece sizes, one row each (0: one piece per tensor; default 4)",
    )
    p.add_argument("--powersgd-ranks", type=_csv(int), default=[1], help="PowerSGD ranks (default 1)")
    p.add_argument(
        "--hook",
        type=_hook_arg,
        default=["qsgd4", "allgather"],
        help="CODEC,MODE of the dist_soup DDP hook row (default qsgd4,allgather; 'none' to skip)",
    )
    p.add_argument(
        "--hook-chunk-mb",
        type=float,
        default=4.0,
        help="chunk size of the dist_soup DDP hook row (0: one stream per bucket)",
    )
    p.add_argument(
        "--malloc-keep",
        action="store_true",
        help="ranks keep freed memory (glibc MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set "
        "for the processes this run starts): no page faults from re-mapping large buffers",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    p.add_argument("--json", default=None, help="append the results to this JSON file")
    p.add_argument("--verbose", action="store_true")
    # one rank of an externally launched job
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--world-size", type=int, default=None)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--where", default=None, help=argparse.SUPPRESS)
    # netns mode
    p.add_argument("--rate", default=None, help="netns mode: tc tbf cap per host, e.g. 1gbit (default none)")
    args = p.parse_args(argv)

    if args.quick:
        args.numel = min(args.numel, 1_000_000)
        args.iters = min(args.iters, 3)
        if args.ranks is None:
            args.ranks = [2]
        if "--modes" not in argv:
            args.modes = ["allgather", "allreduce"]
    if args.ranks is None:
        args.ranks = [2] if command == "netns" else [2, 4]
    if args.numel < 1 or args.iters < 1 or args.warmup < 1 or args.threads < 1 or not args.case_budget > 0:
        p.error("need --numel >= 1, --iters >= 1, --warmup >= 1, --threads >= 1, --case-budget > 0")
    if any(w < 1 for w in args.ranks):
        p.error("--ranks must be positive")
    if command == "netns" and any(w < 2 for w in args.ranks):
        p.error("netns mode needs at least 2 hosts per run")
    if args.rank is not None:
        if args.world_size is None or args.master_port is None:
            p.error("--rank needs --world-size and --master-port (and --master-addr)")
        if not 0 <= args.rank < args.world_size:
            p.error(f"--rank must be in [0, {args.world_size})")
        command = "one"
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ and command == "run":
        command = "one"  # under torchrun
    return command, args


def main(argv: list[str] | None = None) -> int:
    command, args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.malloc_keep:
        # glibc reads these when a process starts: they reach the spawned ranks and the netns
        # hosts' processes, not this one (under torchrun, set them in its environment).
        os.environ.update(MALLOC_MMAP_THRESHOLD_=str(2**30), MALLOC_TRIM_THRESHOLD_=str(2**32))
    if command == "netns":
        return run_netns(args)
    if command == "one":
        run_one_rank(args)
    else:
        run_spawn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
