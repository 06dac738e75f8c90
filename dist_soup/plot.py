"""PNG plots of a run dir: losses, weights, bytes per step, selected tensors over time."""

from __future__ import annotations

import json
from pathlib import Path


def _read(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} has no metrics.jsonl: is it a dist_soup run dir?")
    lines = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    steps = [l for l in lines if "losses" in l]
    if not steps:
        raise ValueError(f"{str(path)!r} holds no step records")
    return steps


def plot_run(run_dir: Path) -> list[Path]:
    """Write losses.png, weights.png, bytes.png and selection.png into ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = _read(run_dir)
    steps = [r["step"] for r in recs]
    names = list(recs[0]["losses"])
    out = []

    def save(fig, name):
        path = run_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in names:
        ax.plot(steps, [r["losses"][k] for r in recs], label=k)
    ax.set(xlabel="step", ylabel="loss (mean over ranks)", title="losses per objective", yscale="log")
    ax.legend(fontsize=8)
    save(fig, "losses.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in names:
        ax.plot(steps, [r["weights"][k] for r in recs], label=k)
    ax.set(xlabel="step", ylabel="weight w_k", title="loss weights (lambda x eta) over time")
    ax.legend(fontsize=8)
    save(fig, "weights.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["bytes_sent"] / 1e3 for r in recs], label="sent (compressed)")
    ax.plot(steps, [r["dense_bytes"] / 1e3 for r in recs], label="fp32 equivalent", linestyle="--")
    ax.set(xlabel="step", ylabel="kB per step (rank 0)", title="bytes per step", yscale="log")
    ax.legend(fontsize=8)
    save(fig, "bytes.png")

    tensors = sorted({t for r in recs for t in r["selected"]})
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(tensors) + 1)))
    for i, t in enumerate(tensors):
        xs = [r["step"] for r in recs if t in r["selected"]]
        ax.scatter(xs, [i] * len(xs), s=8)
    ax.set_yticks(range(len(tensors)), tensors, fontsize=7)
    ax.set(xlabel="step", title="selected shared tensors (S) over time")
    save(fig, "selection.png")
    return out
