"""The evidence of a sweep (``benchmarks/bandwidth_accuracy.py``): results.jsonl, results.md, plots.

Everything is rebuilt from the run dirs and timing files under the sweep's output directory,
so the table always shows what is there (a half-finished sweep shows its finished runs).

Figures per cell, mean +- std over its seeds (std of one seed: none):

* final metric per objective: ``summary.json`` of each run (the final model on held-out data);
* bytes/step: what one rank handed to the collectives per step (``comm.bytes_sent`` over steps
  and ranks);
* Delta_m% vs single-task: the run's own ``delta_m`` (the task's stored ``baselines``, when they
  apply to its options); Delta_m% vs ``versus``: against the mean final metrics of the listed
  cell with the same ``task`` section;
* ms/step at a rate: the median over the timing run's steady-state steps (rank 0; one timing
  run per cell and rate, seed ``seeds[0]``); "loopback" is the quality runs' own median step time
  (the slowest rank of each logged step, 127.0.0.1, periodic evaluation interleaved);
* time to target: the target is the mean final metrics of the ``target`` cell with the same task;
  a run reaches it at its first evaluation whose Delta_m% against it is <= ``target_tolerance``;
  seconds = (steps done there) x ms/step at the rate / 1000, over the seeds that reached it
  ("n/m": only n of m seeds did).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dist_soup import tasks
from dist_soup.tasks import Metric

LOOPBACK = "loopback"


# ------------------------------------------------------------------------ the output layout
def run_dir(out: Path, cell, seed: int) -> Path:
    return out / "runs" / cell.id / f"seed{seed}"


def timing_file(out: Path, rate: str, cell) -> Path:
    return out / "timing" / rate / f"{cell.id}.json"


def finished(spec, out: Path, cell, seed: int) -> bool:
    """Its summary.json is there and was written by this cell's config."""
    from dist_soup import config as config_mod

    try:
        done = json.loads((run_dir(out, cell, seed) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return done.get("config_sha256") == config_mod.fingerprint(spec.config(cell, seed))


# ------------------------------------------------------------------------------- collecting
def _eval_points(run: Path, summary: dict) -> tuple[list[tuple[int, dict]], float | None]:
    """(steps done, metrics) of every periodic evaluation, then the final one; and the median
    step time in ms (the slowest rank of each logged step)."""
    points, step_times = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval" in rec:
            points.append((int(rec["step"]) + 1, rec["eval"]))
        elif rec.get("rank_step_s") and rec.get("step", 0) > 0:  # step 0 pays the start-up
            step_times.append(max(rec["rank_step_s"]))
    final = {k: o["value"] for k, o in summary["objectives"].items()}
    if not points or points[-1][0] != summary["steps"]:
        points.append((summary["steps"], final))
    return points, (1e3 * statistics.median(step_times) if step_times else None)


def collect(spec, out: Path) -> list[dict]:
    """One record per finished run (``kind: quality``) and per timing result (``kind: timing``)."""
    records = []
    for cell in spec.cells:
        for seed in spec.seeds:
            if not finished(spec, out, cell, seed):
                continue
            rd = run_dir(out, cell, seed)
            s = json.loads((rd / "summary.json").read_text())
            points, loop_ms = _eval_points(rd, s)
            steps, world = s["steps"], s["world_size"]
            records.append(
                {
                    "kind": "quality",
                    "cell": cell.id,
                    "axes": cell.axes,
                    "seed": seed,
                    "run_dir": str(rd),
                    "config_sha256": s["config_sha256"],
                    "engine": s.get("engine"),
                    "task": s["task"],
                    "task_section": dataclasses.asdict(spec.config(cell, seed).task),
                    "objectives": {
                        k: {kk: o[kk] for kk in ("metric", "value", "higher_is_better")}
                        for k, o in s["objectives"].items()
                    },
                    "delta_m": s.get("delta_m"),
                    "steps": steps,
                    "world_size": world,
                    "bytes_per_step": s["comm"]["bytes_sent"] / (steps * world),
                    "dense_bytes_per_step": s["comm"]["dense_bytes"] / (steps * world),
                    "time_s": s["time_s"],
                    "ms_per_step_loopback": loop_ms,
                    "evals": [{"steps": n, "values": v} for n, v in points],
                }
            )
    for rate in spec.rates:
        for cell in spec.cells:
            try:
                t = json.loads(timing_file(out, rate, cell).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            records.append(
                {
                    "kind": "timing",
                    "cell": cell.id,
                    "axes": cell.axes,
                    "rate": rate,
                    "loopback": t.get("loopback"),
                    "link": t.get("link"),
                    "error": t.get("error"),
                    **{
                        k: t.get(k)
                        for k in ("ms_median", "ms_mean", "ms_stdev", "n", "sent_bytes", "dense_bytes", "wall_s")
                    },
                }
            )
    return records


# ------------------------------------------------------------------------------ aggregating
def _ms(values: list[float]) -> tuple[float, float | None] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def delta_m(values: dict, reference: dict, objectives: dict) -> float | None:
    """Delta_m% of ``values`` against ``reference`` (``dist_soup.tasks.delta_m``; the directions
    come from the run's summary, so no task needs building); None where it is undefined (a
    reference metric of 0, e.g. BLEU 0 after a few steps of a tiny model)."""
    task = SimpleNamespace(metrics={k: Metric(o["metric"], o["higher_is_better"]) for k, o in objectives.items()})
    if any(reference[k] == 0 for k in objectives):
        return None
    return tasks.delta_m(values, reference, task, tuple(objectives))


def aggregate(spec, records: list[dict]) -> list[dict]:
    """Per cell (grid order): its figures as (mean, std) pairs; missing ones absent."""
    runs: dict[str, list[dict]] = {}
    timing: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["kind"] == "quality":
            runs.setdefault(r["cell"], []).append(r)
        elif not r.get("error") and r.get("ms_median"):
            timing[(r["cell"], r["rate"])] = r

    def final_means(cell_id: str) -> dict | None:
        rs = runs.get(cell_id)
        if not rs:
            return None
        return {k: statistics.fmean(r["objectives"][k]["value"] for r in rs) for k in rs[0]["objectives"]}

    def same_task(candidates: list[str], rs: list[dict]) -> str | None:
        for c in candidates:
            if runs.get(c) and runs[c][0]["task_section"] == rs[0]["task_section"]:
                return c
        return None

    cells = []
    for cell in spec.cells:
        rs = runs.get(cell.id, [])
        row: dict[str, Any] = {"cell": cell.id, "axes": cell.axes, "seeds_done": len(rs), "seeds": len(spec.seeds)}
        cells.append(row)
        if not rs:
            continue
        objectives = rs[0]["objectives"]
        row["task"] = rs[0]["task"]
        row["objectives"] = objectives
        row["final"] = {k: _ms([r["objectives"][k]["value"] for r in rs]) for k in objectives}
        row["bytes_per_step"] = _ms([r["bytes_per_step"] for r in rs])
        row["dense_bytes_per_step"] = rs[0]["dense_bytes_per_step"]
        row["delta_m_single"] = _ms([r["delta_m"] for r in rs])
        ref = same_task(spec.versus, rs)
        if ref:
            means = final_means(ref)
            row["versus"] = ref
            finals = [{k: r["objectives"][k]["value"] for k in objectives} for r in rs]
            row["delta_m_versus"] = _ms([delta_m(f, means, objectives) for f in finals])
        speed = {LOOPBACK: _ms([r["ms_per_step_loopback"] for r in rs])}
        for rate in spec.rates:
            t = timing.get((cell.id, rate))
            if t:
                speed[rate] = (t["ms_median"], None)
                row.setdefault("timed_on_loopback", {})[rate] = bool(t.get("loopback"))
        row["ms_per_step"] = {k: v for k, v in speed.items() if v is not None}
        row["evals"] = _mean_curve(rs)
        target = same_task(spec.target, rs)
        goal = final_means(target) if target else None
        if goal and any(v == 0 for v in goal.values()):
            row["target_undefined"] = target  # Delta_m% against a metric of 0 has no meaning
        elif goal:
            reached = []
            for r in rs:
                gaps = [(e["steps"], delta_m(e["values"], goal, objectives)) for e in r["evals"]]
                reached.append(next((n for n, d in gaps if d is not None and d <= spec.target_tolerance), None))
            row["target"] = target
            row["target_steps"] = reached
            row["time_to_target_s"] = {
                src: _ms([n * ms[0] / 1e3 for n in reached if n is not None]) for src, ms in row["ms_per_step"].items()
            }
    return cells


def _mean_curve(rs: list[dict]) -> list[dict]:
    """Mean over seeds of the evaluations at the steps every seed evaluated."""
    common = set.intersection(*({e["steps"] for e in r["evals"]} for r in rs))
    out = []
    for n in sorted(common):
        vals = [next(e["values"] for e in r["evals"] if e["steps"] == n) for r in rs]
        out.append({"steps": n, "values": {k: statistics.fmean(v[k] for v in vals) for k in vals[0]}})
    return out


# --------------------------------------------------------------------------------- the table
def _pm(x: tuple[float, float | None] | None, fmt: str = ".4g", scale: float = 1.0, std_fmt: str | None = None) -> str:
    """mean ± std (std in ``std_fmt``, default ``fmt``); "-" when there is nothing."""
    if x is None or x[0] is None:
        return "-"
    mean, std = x
    return format(mean * scale, fmt) + ("" if std is None else f" ± {format(std * scale, std_fmt or fmt)}")


def markdown(spec, cells: list[dict], setup: dict, machine: dict) -> str:
    axes = list(dict.fromkeys(a for c in spec.cells for a in c.axes))
    objectives = list(dict.fromkeys(k for c in cells for k in c.get("objectives", {})))
    metric_of = {}
    for c in cells:
        for k, o in c.get("objectives", {}).items():
            metric_of[k] = f"{o['metric']} {'↑' if o['higher_is_better'] else '↓'}"
    rates = [r for r in spec.rates if any(r in c.get("ms_per_step", {}) for c in cells)]
    loop_rates = {r for c in cells for r, lb in c.get("timed_on_loopback", {}).items() if lb}
    lines = [
        f"## Sweep {spec.name}{' (quick)' if spec.quick else ''}",
        "",
        f"Command: `{setup['command']}` ({setup['date']}, {setup['wall_s'] / 60:.1f} min this invocation). "
        f"Spec: `{setup['spec']}`.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, Python {machine['python']}; "
        f"load average {' '.join(f'{x:.2f}' for x in machine['loadavg_start'])} at start, "
        f"{' '.join(f'{x:.2f}' for x in machine['loadavg_end'])} at end.",
        f"Runs: {spec.steps} steps on {spec.nproc} processes (gloo, 127.0.0.1), seeds {spec.seeds}, evaluation every "
        f"{spec.eval_every or spec.steps} steps; quality from one run per (cell, seed)"
        + (
            f" (the link rate does not change the arithmetic), step time per rate from one {spec.timing_steps}-step "
            f"timing run per cell (steps {spec.timing_warmup}-{spec.timing_steps}, seed {spec.seeds[0]}) across "
            f"{spec.nproc} namespace hosts capped by tc."
            if spec.rates
            else "; no timing runs (rates: [])."
        ),
    ]
    if loop_rates:
        lines.append(f"Timed over 127.0.0.1 (no namespaces here): {', '.join(sorted(loop_rates))}.")
    missing = [r for r in spec.rates if r not in rates]
    if missing:
        lines.append(f"Not measured: {', '.join(missing)} (timing skipped or failed).")
    incomplete = [f"{c['cell']} ({c['seeds_done']}/{c['seeds']})" for c in cells if c["seeds_done"] < c["seeds"]]
    if incomplete:
        lines.append(f"Seeds missing (not run or failed): {', '.join(incomplete)}.")
    if setup.get("interrupted"):
        lines.append(f"Interrupted ({setup['interrupted']}).")
    label = spec.versus_label or "versus"
    head = [
        *axes,
        "bytes/step/rank (KB)",
        *[f"{k} {metric_of[k]}" for k in objectives],
        "Δm% vs single-task",
        f"Δm% vs {label}",
    ]
    lines += [
        "",
        "### Quality (mean ± std over seeds)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(axes) + "---:|" * (len(head) - len(axes)),
    ]
    for c in cells:
        vals = [c["axes"].get(a, "-") for a in axes]
        if not c["seeds_done"]:
            lines.append("| " + " | ".join(vals + ["not run"] + [""] * (len(head) - len(axes) - 1)) + " |")
            continue
        vals += [_pm(c["bytes_per_step"], ".1f", 1e-3)]
        vals += [_pm(c["final"].get(k), ".4g", std_fmt=".2g") for k in objectives]
        vals += [_pm(c["delta_m_single"], "+.1f", std_fmt=".1f"), _pm(c.get("delta_m_versus"), "+.1f", std_fmt=".1f")]
        lines.append("| " + " | ".join(vals) + " |")
    sources = [LOOPBACK, *rates]
    target = any(c.get("target") or c.get("target_undefined") for c in cells)
    head = [*axes, *[f"ms/step {s}" for s in sources]]
    if target:
        head += ["target at step", *[f"time to target {s} (s)" for s in sources]]
    lines += [
        "",
        "### Speed" + (" and time to target" if target else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(axes) + "---:|" * (len(head) - len(axes)),
    ]
    for c in cells:
        vals = [c["axes"].get(a, "-") for a in axes]
        ms = c.get("ms_per_step", {})
        vals += [_pm(ms.get(s), ".1f") for s in sources]
        if target:
            steps = c.get("target_steps")
            if c.get("target_undefined"):
                vals += ["undefined"] + ["-"] * len(sources)
            elif steps is None:
                vals += ["-"] * (1 + len(sources))
            else:
                hit = [n for n in steps if n is not None]
                frac = "" if len(hit) == len(steps) else f" ({len(hit)}/{len(steps)})"
                vals.append((_pm(_ms(hit), ".0f") if hit else "never") + frac)
                vals += [(_pm(c["time_to_target_s"].get(s), ".1f") + frac) if hit and s in ms else "-" for s in sources]
        lines.append("| " + " | ".join(vals) + " |")
    lines += [
        "",
        "bytes/step/rank: what one rank handed to the collectives per step (DDP: its buckets, or what torch's hook "
        "all-reduces). ms/step loopback: the quality runs' median step time (slowest rank) on 127.0.0.1, evaluation "
        "interleaved; ms/step RATE: median of rank 0's steady-state steps across the namespace hosts at that rate. "
        f"Δm% (negative is better): against the task's single-task baselines (when stored for its options) and "
        f"against {label} (the same task).",
    ]
    if target:
        lines.append(
            f"Target: the mean final metrics of {', '.join(spec.target)} (same task); reached at the first "
            f"evaluation with Δm% <= {spec.target_tolerance:g} against it; time = steps x ms/step; (n/m): "
            "only n of m seeds reached it, mean over those; undefined: a metric of the target is 0."
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------- the plots
def _rate_bits(rate: str) -> float:
    if rate == "uncapped":
        return float("inf")
    num, unit = rate[:-4], rate[-4]  # "100mbit" -> 100, m
    return float(num) * {"k": 1e3, "m": 1e6, "g": 1e9}[unit]


def plots(spec, cells: list[dict], plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    done = [c for c in cells if c["seeds_done"]]
    by_task: dict[str, list[dict]] = {}
    for c in done:
        by_task.setdefault(c["task"], []).append(c)
    suffix = (lambda t: "") if len(by_task) == 1 else (lambda t: f"_{t}")

    def objective_axes(objectives: list[str], title: str):
        fig, axs = plt.subplots(1, len(objectives), figsize=(4.2 * len(objectives), 3.6), squeeze=False)
        fig.suptitle(title)
        return fig, axs[0]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = plot_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for task, group in by_task.items():
        objectives = list(group[0]["objectives"])
        fig, axs = objective_axes(objectives, f"{spec.name}: final held-out metric vs bytes sent ({task})")
        for ax, k in zip(axs, objectives):
            for c in group:
                x = c["bytes_per_step"][0] / 1e3
                m, s = c["final"][k]
                ax.errorbar([x], [m], yerr=[s or 0.0], fmt="o", capsize=3)
                ax.annotate(c["cell"], (x, m), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("KB sent per step per rank")
            o = group[0]["objectives"][k]
            ax.set_ylabel(f"{k}: {o['metric']} ({'higher' if o['higher_is_better'] else 'lower'} is better)")
        save(fig, f"quality_vs_bytes{suffix(task)}.png")

        sources = [s for s in [LOOPBACK, *spec.rates] if any(s in c["ms_per_step"] for c in group)]
        for src in sources:
            fig, axs = objective_axes(objectives, f"{spec.name}: metric vs wall-clock at {src} ({task}, mean of seeds)")
            for ax, k in zip(axs, objectives):
                for c in group:
                    if src not in c["ms_per_step"] or not c["evals"]:
                        continue
                    ms = c["ms_per_step"][src][0]
                    ax.plot(
                        [e["steps"] * ms / 1e3 for e in c["evals"]],
                        [e["values"][k] for e in c["evals"]],
                        marker=".",
                        label=c["cell"],
                    )
                ax.set_xlabel(f"seconds at {src} (steps x ms/step)")
                ax.set_ylabel(k)
            axs[-1].legend(fontsize=6, loc="best")
            save(fig, f"metric_vs_time_{src}{suffix(task)}.png")

    rates = sorted((r for r in spec.rates if any(r in c["ms_per_step"] for c in done)), key=_rate_bits)
    if rates:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for c in done:
            pts = [(i, c["ms_per_step"][r][0]) for i, r in enumerate(rates) if r in c["ms_per_step"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c["cell"])
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("link rate (tc tbf per host)")
        ax.set_ylabel("ms per step (median, steady state)")
        ax.set_yscale("log")
        ax.set_title(f"{spec.name}: step time vs link rate")
        ax.legend(fontsize=6, loc="best")
        save(fig, "step_time_vs_rate.png")
    return written


def write(spec, out: Path, setup: dict, machine: dict) -> list[Path]:
    """results.jsonl, results.md and the plots of what ``out`` holds; the paths written."""
    records = collect(spec, out)
    results = out / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    cells = aggregate(spec, records)
    paths = plots(spec, cells, out / "plots")
    md = markdown(spec, cells, setup, machine)
    if paths:
        md += "\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in paths)
    (out / "results.md").write_text(md + "\n")
    print("\n" + md.split("\n\n![")[0], flush=True)
    return [results, out / "results.md", *paths]
