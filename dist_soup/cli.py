"""``dist-soup`` / ``python -m dist_soup``: train and plot.

    dist-soup train --config FILE [--nproc N] [--run-dir DIR] [--steps N] [--resume] [--set k=v ...]
    dist-soup train --config FILE --deepspeed DS_JSON [--nproc N] ...   (DeepSpeed plugin, ZeRO stage 0)
    dist-soup plot RUN_DIR

``--nproc N`` starts N local processes joined by gloo on 127.0.0.1; under torchrun or mpirun
the launcher's environment decides and ``--nproc`` must be left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-soup", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML config file (see configs/)")
    t.add_argument("--nproc", type=int, default=None, help="number of local processes (gloo on 127.0.0.1)")
    t.add_argument(
        "--run-dir", default=None, help="where config, metrics, checkpoints and summary go (default runs/<config name>)"
    )
    t.add_argument("--steps", type=int, default=None, help="override train.steps")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in the run dir (a fresh start if there is none)",
    )
    t.add_argument(
        "--deepspeed",
        default=None,
        metavar="DS_JSON",
        help="train through DeepSpeed (dist_soup.integrations.deepspeed) with this DeepSpeed JSON config",
    )
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.batch_size=16",
    )
    pl = sub.add_parser("plot", help="write PNG plots of a run dir")
    pl.add_argument("run_dir")
    return p


def _worker(rank: int, world: int, cfg, run_dir: str, resume: bool, deepspeed: str | None = None) -> None:
    os.environ.setdefault("DIST_SOUP_BACKEND", "gloo")
    summary = _train(cfg, run_dir, resume, deepspeed)
    if summary is not None:
        print_summary(summary, run_dir)


def print_summary(summary: dict, run_dir: str) -> None:
    ref = summary.get("ew_reference")
    rows = [("objective", "first loss", "final loss", "metric", "value") + (("ew ref",) if ref else ())]
    for name, o in summary["objectives"].items():
        arrow = "↑" if o["higher_is_better"] else "↓"
        rows.append(
            (name, f"{o['first_loss']:.4f}", f"{o['final_loss']:.4f}", f"{o['metric']} {arrow}", f"{o['value']:.4f}")
            + ((f"{ref[name]:.4f}",) if ref else ())
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "  ".join("-" * w for w in widths)
    out = ["", line]
    for i, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            out.append(line)
    out.append(line)
    c = summary["comm"]
    ratio = f"{c['ratio']:.1f}x fewer" if c["ratio"] else "n/a"
    out.append(
        f"bytes sent (all ranks): {c['bytes_sent'] / 1e6:.2f} MB vs fp32 {c['dense_bytes'] / 1e6:.2f} MB ({ratio})"
    )
    procs = "1 process" if summary["world_size"] == 1 else f"{summary['world_size']} processes"
    out.append(f"steps: {summary['steps']} on {procs}, {summary['steps_per_s']:.1f} steps/s, {summary['time_s']:.1f} s")
    if summary.get("delta_m") is not None:
        out.append(f"Delta_m vs single-task baselines: {summary['delta_m']:+.1f}% (negative is better)")
    if ref:
        out.append(
            f"Delta_m vs ew ref: {summary['delta_m_vs_ew']:+.1f}% (ew ref: the plain sum of the losses, "
            "stored for this task at the quickstart's budget; negative is better)"
        )
    if summary.get("skipped_steps"):
        out.append(f"skipped steps (non-finite): {summary['skipped_steps']}")
    if summary["selected"]:  # none under train.engine ddp
        out.append(f"selected tensors: {', '.join(summary['selected'])}")
    out.append(f"run dir: {run_dir}")
    print("\n".join(out), flush=True)


def _note(message: str) -> None:
    """A config note, once per run: under torchrun or mpirun every rank loads the config."""
    ranks = [os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") if k in os.environ]
    if not ranks or ranks[0] == "0":
        print(f"dist-soup: note: {message}", file=sys.stderr, flush=True)


def _train(cfg, run_dir: str, resume: bool, deepspeed: str | None) -> dict | None:
    if deepspeed is not None:
        if cfg.train.engine == "ddp":
            raise ConfigError(
                "train.engine: 'ddp' is the torch DDP baseline and --deepspeed trains through "
                "DeepSpeed; use one or the other"
            )
        from .integrations import deepspeed_train

        return deepspeed_train.run(cfg, Path(run_dir), deepspeed, resume=resume)
    from . import train

    return train.run(cfg, Path(run_dir), resume=resume)


def train_command(args) -> int:
    from . import config as config_mod
    from . import process_group

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = config_mod.load(args.config, overrides, on_note=_note)
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    launched = process_group.launcher_env() != "local"
    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc {args.nproc}: need at least 1 process")
        if launched:
            raise ConfigError(
                "--nproc is for local runs; under torchrun or mpirun the launcher sets the number of processes"
            )
    if args.nproc is None or args.nproc == 1 or launched:
        summary = _train(cfg, run_dir, args.resume, args.deepspeed)
        if summary is not None:
            print_summary(summary, run_dir)
        return 0
    import torch.multiprocessing as mp

    from .process_group import spawn_local

    try:
        spawn_local(_worker, args.nproc, cfg, run_dir, args.resume, args.deepspeed)
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1]
        print(f"dist-soup: a worker failed: {last}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as exc:
        print(f"dist-soup: a worker died: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return train_command(args)
        from .plot import plot_run

        for path in plot_run(Path(args.run_dir)):
            print(path)
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"dist-soup: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
