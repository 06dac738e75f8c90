"""What a run writes and shows: metrics.jsonl lines, summary.json, the progress display."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import checkpoint, tasks
from . import config as config_mod
from .builders import param_sha256
from .config import Config


def write_summary(
    run_dir, cfg, task, model, engine, objectives, first_losses, last_res, counts, start, elapsed
) -> dict:
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
        "delta_m": delta_m(task, evaluation, objectives),
        **ew_reference(task, evaluation, objectives),
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


def delta_m(task, evaluation: dict, objectives: tuple[str, ...]) -> float | None:
    """Delta_m% against the task's stored single-task baselines, when it has them."""
    baselines = getattr(task, "baselines", None) or {}
    if len(objectives) < 2 or any(k not in baselines for k in objectives):
        return None
    return tasks.delta_m(evaluation, baselines, task, objectives)


def ew_reference(task, evaluation: dict, objectives: tuple[str, ...]) -> dict:
    """The stored quality of the plain sum of losses (``ew``) on this task, when it has one for
    these objectives: ``{"ew_reference": {objective: metric}, "delta_m_vs_ew": Delta_m%}``."""
    ref = getattr(task, "ew_reference", None) or {}
    if len(objectives) < 2 or any(k not in ref for k in objectives):
        return {}
    return {
        "ew_reference": {k: ref[k] for k in objectives},
        "delta_m_vs_ew": tasks.delta_m(evaluation, ref, task, objectives),
    }


def metrics_line(res, step: int) -> dict:
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


def truncate_metrics(path: Path, start: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will be redone)."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", -1) < start:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    checkpoint.atomic_write_text(path, "".join(l + "\n" for l in keep))


class Progress:
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
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k[:8]: f"{v:.3f}" for k, v in list(res.losses.items())[:4]})
        elif self.mode == "plain" and (step % self.cfg.logging.every == 0 or step == self.cfg.train.steps - 1):
            losses = " ".join(f"{k}={v:.4f}" for k, v in res.losses.items())
            print(f"[dist_soup] step {step + 1}/{self.cfg.train.steps} {losses}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
