"""The CUDA/NCCL path in one short run, for a machine with GPUs: does it work, and how fast.

    python benchmarks/gpu_check.py                 # every visible GPU, NCCL (a few minutes)
    python benchmarks/gpu_check.py --cpu --quick   # the same checks on gloo and the CPU (smoke run)

The project's CI machines have no GPU, so everything below runs on CPU there; this script is the
one place that drives the device path end to end, as a user would start it. Checks, each a row
of the report (``gpu_check.json`` and ``gpu_check.md`` in ``--out``):

1. ``kernels`` (this process, ``cuda:0``): every codec of ``KERNEL_CODECS`` encodes and decodes
   ``--numel`` values; encode, decode and the mean of two payloads into a kept buffer (the
   decode a training step runs) in GB/s of fp32 input, beside ``copy_`` of the same tensor;
   QSGD's compiled kernels (Triton on CUDA) must give the bytes of its eager ones (norm "max").
2. ``engine``: ``torchrun --standalone --nproc-per-node G -m dist_soup train --config
   configs/quickstart.yaml`` (NCCL, one GPU per rank): the quickstart's soup step (Jacobian,
   compressed exchanges, coordinator solve, overlapped compressed update).
3. ``deepspeed``: the same run through the DeepSpeed plugin (``--deepspeed configs/deepspeed.json``).
4. ``ddp_hook``: torchrun of this file's ``--ddp-worker``: the task's model under torch DDP with
   ``dist_soup.integrations.ddp.register(model, "qsgd", bits=4)`` beside plain DDP (fp32
   all-reduce) on the same batches and optimizer: ms per step of both and the bytes sent.

A training row passes when the sum of the objectives' losses ended below its first value and no
step was skipped (``ddp_hook`` also checks that every rank ends with the same parameters). The exit
status is 1 when a row failed.
NCCL takes one rank per GPU, so on a one-GPU machine the collectives have a single rank: the
codecs, the device kernels and the NCCL calls run, the wire does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compress_throughput import timeit  # noqa: E402

from dist_soup import builders, config, tasks  # noqa: E402
from dist_soup.compress import build  # noqa: E402
from tests.netns_cluster import tree  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"
DEEPSPEED_CONFIG = ROOT / "configs" / "deepspeed.json"
KERNEL_CODECS = (
    ("qsgd4", "qsgd", {"bits": 4}),
    ("qsgd8", "qsgd", {"bits": 8}),
    ("adacomp", "adacomp", {}),
    ("fp16", "fp16", {}),
)
CHECKS = ("kernels", "engine", "deepspeed", "ddp_hook")
TIMED_OUT = 124  # a training row's return code when it ran past --row-timeout (as timeout(1))
# --quick: a small model and few steps, so the smoke run takes seconds per row.
QUICK_SET = ("task.options.hidden=64", "task.options.layers=2")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn, device: torch.device, reps: int) -> float:
    """``compress_throughput.timeit`` of ``fn`` with the device synchronised after every call
    (CUDA kernels return before they finish)."""

    def call() -> None:
        fn()
        _sync(device)

    return timeit(call, reps)


def check_kernels(device: torch.device, numel: int, reps: int) -> list[dict]:
    """Row per codec: GB/s of encode, decode and mean2 (fp32 input bytes per second)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(numel, device=device, generator=gen)
    other = torch.randn(numel, device=device, generator=gen)
    out = torch.empty_like(x)
    copy_s = _seconds(lambda: out.copy_(x), device, reps)
    rows = []
    for label, name, options in KERNEL_CODECS:
        row: dict = {"check": "kernels", "name": label, "device": str(device)}
        try:
            row.update(_codec_figures(name, options, x, other, out, reps))
            row["copy_gbs"] = 4 * numel / copy_s / 1e9
        except Exception as exc:  # a failing codec is a failed row, not the end of the check
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def _codec_figures(name: str, options: dict, x: torch.Tensor, other: torch.Tensor, out: torch.Tensor, reps: int):
    """One codec on ``x`` (and ``other``, the second rank's tensor of the mean)."""
    stream = build(name, seed=0, **options)
    payload = stream.compress(x)
    theirs = build(name, seed=0, rank=1, **options).compress(other)
    decoded = stream.decompress(payload)
    exact = (x + other) / 2
    mean = stream.decompress_mean([payload, theirs], out=out).clone()
    err = float((decoded - x).norm() / x.norm())
    mean_err = float((mean - exact).norm() / exact.norm())
    gbs = lambda s: 4 * x.numel() / s / 1e9  # noqa: E731
    figures = {
        "encode_gbs": gbs(_seconds(lambda: stream.compress(x), x.device, reps)),
        "decode_gbs": gbs(_seconds(lambda: stream.decompress(payload), x.device, reps)),
        "mean2_gbs": gbs(_seconds(lambda: stream.decompress_mean([payload, theirs], out=out), x.device, reps)),
        "bits_per_value": 8 * payload.nbytes / x.numel(),
        "rel_err": err,
        "mean_rel_err": mean_err,
        # a lossy codec's error is bounded; far above 1 means a broken decode
        "ok": err < 1.0 and mean_err < 1.0 and decoded.device == x.device,
    }
    if name == "qsgd":
        eager = build(name, seed=0, backend="eager", **options).compress(x).to_bytes()
        compiled = build(name, seed=0, backend="compiled", **options).compress(x).to_bytes()
        figures["compiled_equals_eager"] = bool(torch.equal(eager.cpu(), compiled.cpu()))
        figures["ok"] = figures["ok"] and figures["compiled_equals_eager"]
    return figures


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it ended on its own
        pass


def _torchrun(nproc: int, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """torchrun of ``args``; past ``timeout`` seconds it and every process below it are killed
    and the result has return code ``TIMED_OUT`` with what they printed until then."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        # Freeze the tree until no new process shows (a stopped process forks nothing), then kill it.
        frozen: list[int] = []
        while new := [pid for pid in tree(proc.pid) if pid not in frozen]:
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            frozen += new
        for pid in frozen:
            _signal(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()  # the pipes close once every writer is gone
        return subprocess.CompletedProcess(
            cmd, TIMED_OUT, stdout, stderr + f"\n[gpu_check] timed out after {timeout} s"
        )


def _failed(check: str, name: str, proc: subprocess.CompletedProcess, out: Path) -> dict:
    """A failed run's row: the workers' own error lines (not torchrun's report around them);
    the whole output goes to ``<out>/<check>.log``."""
    text = proc.stdout + proc.stderr
    log = out / f"{check}.log"
    log.write_text(text)
    noise = ("elastic", "error_file", "ChildFailedError", "errors.html")
    errors = [line for line in text.splitlines() if "error" in line.lower() and not any(n in line for n in noise)]
    return {
        "check": check,
        "name": name,
        "ok": False,
        "error": f"{'timed out' if proc.returncode == TIMED_OUT else f'exit status {proc.returncode}'}; "
        f"whole output in {log}",
        "log_tail": (errors or text.splitlines())[-15:],
    }


def check_training(
    check: str, nproc: int, steps: int, sets: list[str], extra: list[str], out: Path, env: dict, timeout: float
) -> dict:
    """One ``dist_soup train`` run under torchrun; the row reads its summary.json."""
    run_dir = out / f"run-{check}"
    args = ["-m", "dist_soup", "train", "--config", str(CONFIG), "--run-dir", str(run_dir), "--steps", str(steps)]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    proc = _torchrun(nproc, args + extra, env, timeout)
    if proc.returncode != 0:
        return _failed(check, "quickstart", proc, out)
    summary = json.loads((run_dir / "summary.json").read_text())
    objectives = summary["objectives"]
    fell = sum(o["final_loss"] for o in objectives.values()) < sum(o["first_loss"] for o in objectives.values())
    return {
        "check": check,
        "name": "quickstart",
        "world_size": summary["world_size"],
        "steps": summary["steps"],
        "steps_per_s": summary["steps_per_s"],
        "wall_s": time.perf_counter() - t0,
        "fewer_bytes": summary["comm"]["ratio"],
        "losses": {k: [o["first_loss"], o["final_loss"]] for k, o in objectives.items()},
        "skipped_steps": summary["skipped_steps"],
        "param_sha256": summary["param_sha256"],  # rank 0's parameters
        "ok": fell and summary["skipped_steps"] == 0,
    }


def check_ddp_hook(nproc: int, steps: int, sets: list[str], out: Path, env: dict, timeout: float) -> list[dict]:
    result = out / "ddp_hook.json"
    args = [str(Path(__file__).resolve()), "--ddp-worker", "--steps", str(steps), "--out", str(result)]
    for s in sets:
        args += ["--set", s]
    proc = _torchrun(nproc, args, env, timeout)
    if proc.returncode != 0:
        return [_failed("ddp_hook", "ddp + dist_soup qsgd4", proc, out)]
    return json.loads(result.read_text())


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of ``ddp_hook``: plain DDP, then DDP with dist_soup's hook, same batches."""
    import torch.distributed as dist

    from dist_soup import process_group
    from dist_soup.ddp_baseline import DDPBaseline
    from dist_soup.integrations import ddp
    from dist_soup.sampler import ShardedSampler

    kind, rank, world = process_group.init_distributed()
    device = process_group.device_for(kind)
    cfg = config.load(CONFIG, list(args.set))
    task = tasks.build(cfg.task.name, **cfg.task.options)
    objectives = builders.objectives_of(cfg, task)
    rows = []
    for label, hooked in (("plain ddp fp32", False), ("ddp + dist_soup qsgd4", True)):
        net = task.build_model(cfg.seed).to(device)
        base = DDPBaseline(net, builders.build_optimizer(cfg, net), objectives, config.DDPConfig(), seed=cfg.seed)
        state = ddp.register(base.model, "qsgd", bits=4) if hooked else None
        sampler = ShardedSampler(task.train_size(), cfg.train.batch_size, rank, world, cfg.seed)
        times, totals, sent = [], [], 0
        for step in range(args.steps):
            batch = task.batch(sampler.indices(step))
            if device.type != "cpu":
                batch = batch.to(device)
            _sync(device)
            t0 = time.perf_counter()
            losses = task.losses(base.model, batch)
            res = base.step({k: losses[k] for k in objectives})
            _sync(device)
            times.append(time.perf_counter() - t0)
            totals.append(sum(res.losses.values()))
            sent += res.bytes_sent
        if state is not None:
            sent = state.exchange.stats.bytes_sent
            state.close()
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        k = max(1, args.steps // 5)
        first, last = statistics.mean(totals[:k]), statistics.mean(totals[-k:])
        steady = times[k:] or times
        rows.append(
            {
                "check": "ddp_hook",
                "name": label,
                "world_size": world,
                "ms_per_step": 1e3 * statistics.median(steady),
                "sent_mb_per_step": sent / args.steps / 1e6,
                "loss_first_last": [first, last],
                "ranks_agree": bool(torch.equal(lo, hi)),
                "ok": last < first and bool(torch.equal(lo, hi)),
            }
        )
        base.close()
    if rank == 0:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    process_group.shutdown_distributed(kind)


def report(rows: list[dict], machine: str) -> str:
    lines = [f"## GPU check\n\n{machine}\n", "| check | row | ok | figures |", "|---|---|---|---|"]
    skip = {"check", "name", "ok", "device", "log_tail"}
    for r in rows:
        figures = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k not in skip
        )
        lines.append(f"| {r['check']} | {r['name']} | {'yes' if r['ok'] else '**no**'} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU, 2 ranks (no GPU needed)")
    p.add_argument("--quick", action="store_true", help="small model, few steps and values (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="training steps per row (default 60, --quick 8)")
    p.add_argument("--numel", type=int, default=None, help="values per kernel call (default 2**24)")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    p.add_argument("--set", action="append", default=[], help="config override for the training rows")
    p.add_argument("--row-timeout", type=float, default=600, help="seconds a training row may run (default 600)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        p.error(f"--checks: unknown {unknown}; known: {', '.join(CHECKS)}")
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device visible; use --cpu for the same checks on gloo and the CPU")
    steps = args.steps or (8 if args.quick else 60)
    numel = args.numel or (1 << 16 if args.quick else 1 << 24)
    sets = list(QUICK_SET if args.quick else ()) + list(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.cpu:
        env.update(DIST_SOUP_BACKEND="gloo", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        nproc, device = 2, torch.device("cpu")
    else:
        nproc, device = torch.cuda.device_count(), torch.device("cuda", 0)
    if args.quick:
        env["DIST_SOUP_COMPILE"] = "0"  # eager kernels: no compile time in a smoke run
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    machine = (
        f"{platform.node()}: GPU {gpu} x {torch.cuda.device_count() if device.type == 'cuda' else 0}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"backend {'gloo' if args.cpu else 'nccl'}, {nproc} ranks; "
        f"`python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    rows: list[dict] = []
    t = args.row_timeout
    plugin = ["--deepspeed", str(DEEPSPEED_CONFIG)]
    runs = {
        "kernels": lambda: check_kernels(device, numel, reps=3 if args.quick else 20),
        "engine": lambda: [check_training("engine", nproc, steps, sets, [], args.out, env, t)],
        "deepspeed": lambda: [check_training("deepspeed", nproc, steps, sets, plugin, args.out, env, t)],
        "ddp_hook": lambda: check_ddp_hook(nproc, steps, sets, args.out, env, t),
    }
    for check in (c for c in CHECKS if c in checks):
        rows += runs[check]()
        # after every check: a run stopped from outside still leaves the rows it finished
        (args.out / "gpu_check.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        (args.out / "gpu_check.md").write_text(report(rows, machine))
    print(report(rows, machine))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
