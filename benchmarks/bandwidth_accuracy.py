"""Sweep runner: a grid of training configs as real multi-process runs, then one evidence table.

    python benchmarks/bandwidth_accuracy.py benchmarks/specs/bandwidth_accuracy.yaml
    python benchmarks/bandwidth_accuracy.py benchmarks/specs/recipes.yaml --out runs/sweeps/recipes
    python benchmarks/bandwidth_accuracy.py SPEC.yaml --quick        # the spec's small subset (CI)
    python benchmarks/bandwidth_accuracy.py SPEC.yaml --list         # the cells and their overrides
    python benchmarks/bandwidth_accuracy.py SPEC.yaml --report-only  # table and plots from what is there
    python benchmarks/bandwidth_accuracy.py SPEC.yaml --cells 'ddp_*'  # run only these cells (globs)

**Design.** The link rate does not change the arithmetic: a run is deterministic from its config
and seed whatever the wire's speed. So the *quality* of a (cell, seed) (the final held-out metric
per objective, and the metric against the step from periodic evaluation) comes from ONE run,
``python -m dist_soup train --config BASE --set ... --nproc N --run-dir ...`` on loopback, and
the *step time* of a cell at each link rate from a short timing run of the same config across
network-namespace hosts capped by ``tc`` (``benchmarks/e2e_hosts.py``: its hosts, torchrun jobs
and figures). Time to target = the steps of the first evaluation that reaches the target x the
cell's ms/step at that rate. Quality runs use the codecs' eager kernels (``DIST_SOUP_COMPILE=0``:
the same bytes as the compiled ones, without their start-up); timing runs use what users run
(compiled), unless ``--eager``.

**Spec** (YAML; every key is checked, an error names it)::

    name: bandwidth_accuracy           # default: the file's stem; output in runs/sweeps/NAME
    base:
      config: configs/quickstart.yaml  # relative to the repository root (or absolute)
      set: [task.options={languages: 2}]   # --set overrides: "key=value" strings, or a mapping key: value
    steps: 200                         # train.steps of every run
    eval_every: 25                     # logging.eval_every: the metric-vs-step points
    nproc: 2                           # processes per run (and namespace hosts of the timing runs)
    seeds: [0, 1, 2]
    grid:                              # axes -> named values -> override sets; cells = their product
      method:
        ddp_fp32: [train.engine=ddp]
        qsgd4: {compression.update.name: qsgd, compression.update.options: {bits: 4}}
    # grid may also be a list of such mappings: the union of their products (cell ids unique)
    rates: [uncapped, 1gbit, 100mbit]  # link rates of the timing runs ([]: none)
    timing: {steps: 40, warmup: 10}    # timing runs: steps, and the first measured step
    target: [ddp_fp32]                 # time to target: the final quality of this cell (mean over
    target_tolerance: 0.0              #   seeds), reached when Delta_m% against it <= tolerance
    versus: [ddp_fp32]                 # a Delta_m% column against this cell (per task: the listed
    versus_label: DDP fp32             #   cell with the same task section)
    run_timeout_s: 900
    quick:                             # --quick: these keys replace the ones above; `cells` keeps a subset,
      cells: [ddp_fp32, qsgd4]         #   `set` adds overrides after base.set
      seeds: [0, 1]
      steps: 20
      set: [task.options={languages: 2, n_train: 600}]

A cell's overrides apply after ``base.set`` (and ``quick.set``); then the sweep sets
``train.steps``, ``logging.eval_every``, ``seed``, ``checkpoint.every=0`` and
``logging.progress=none``. Cell ids join the value names of the cell's axes with ``+``.

**Resume.** A (cell, seed) whose run dir holds a summary.json with the fingerprint of the
cell's config (``config_sha256``) is not rerun; a run dir without one (unfinished, or of an
edited spec) starts afresh. A timing result is reused while its config, steps and rate match.

**Output** (``--out DIR``, default ``runs/sweeps/NAME``, ``-quick`` appended with ``--quick``):
``runs/CELL/seedK/`` (each run dir), ``logs/``, ``timing/RATE/CELL.json``, ``results.jsonl`` (one
line per run and per timing), ``results.md`` (mean +- std over seeds: ms/step per rate, bytes
per step, final metric per objective, time to target per rate, Delta_m% against the task's
single-task baselines and against ``versus``), ``plots/`` (quality vs bytes sent, step time vs
link rate, metric vs wall-clock per rate). See ``benchmarks/sweep_report.py``.

Capped rates need network namespaces (root, iproute2); without them (or with ``--loopback``)
only ``uncapped`` is timed, over 127.0.0.1, and the capped rates are reported as not measured.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import e2e_hosts  # noqa: E402
import sweep_report  # noqa: E402
import yaml  # noqa: E402
from sweep_report import finished, run_dir, timing_file  # noqa: E402

from dist_soup import config as config_mod  # noqa: E402

SPEC_KEYS = (
    "name",
    "base",
    "steps",
    "eval_every",
    "nproc",
    "seeds",
    "grid",
    "rates",
    "timing",
    "target",
    "target_tolerance",
    "versus",
    "versus_label",
    "run_timeout_s",
    "quick",
)
QUICK_KEYS = ("cells", "set", "steps", "eval_every", "seeds", "rates", "timing", "run_timeout_s")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_RATE = re.compile(r"^(uncapped|\d+(\.\d+)?[kmg]bit)$")


class SpecError(ValueError):
    """A sweep spec that is malformed; the message names the key."""


@dataclass(frozen=True)
class Cell:
    id: str
    axes: dict  # axis name -> value name
    overrides: tuple[str, ...]


@dataclass
class Spec:
    path: Path
    name: str
    base_config: Path
    base_set: tuple[str, ...]
    steps: int
    eval_every: int
    nproc: int
    seeds: list[int]
    cells: list[Cell]
    rates: list[str]
    timing_steps: int = 40
    timing_warmup: int = 10
    target: list[str] = field(default_factory=list)
    target_tolerance: float = 0.0
    versus: list[str] = field(default_factory=list)
    versus_label: str = ""
    run_timeout_s: float = 900.0
    quick: bool = False

    def overrides(self, cell: Cell, seed: int) -> list[str]:
        """Every ``--set`` of the run of ``cell`` with ``seed``, in the order they apply."""
        return [
            *self.base_set,
            *cell.overrides,
            f"train.steps={self.steps}",
            f"logging.eval_every={self.eval_every}",
            f"seed={seed}",
            "checkpoint.every=0",
            "logging.progress=none",
        ]

    def config(self, cell: Cell, seed: int):
        """The resolved, checked config of that run (what ``dist-soup train`` will run)."""
        return config_mod.load(self.base_config, self.overrides(cell, seed), on_note=lambda _m: None)

    def cell(self, cell_id: str) -> Cell:
        return next(c for c in self.cells if c.id == cell_id)


# ------------------------------------------------------------------------------------ the spec
def _fail(path: Path, key: str, problem: str):
    raise SpecError(f"spec {path}: {key}: {problem}")


def _int(path, key, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(path, key, f"{value!r} must be an integer >= {low}")
    return value


def _overrides(path: Path, key: str, value: Any) -> tuple[str, ...]:
    """A list of "key=value" strings, or a mapping dotted key -> value (given as JSON, which YAML reads)."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(f"{k}={json.dumps(v)}" for k, v in value.items())
    if not isinstance(value, list) or not all(isinstance(s, str) and "=" in s for s in value):
        _fail(path, key, f'{value!r} must be a list of "key=value" strings or a mapping of keys to values')
    return tuple(value)


def _names(path: Path, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(path, key, f"{value!r} must be a cell id or a list of cell ids")
    return value


def _cells(path: Path, grid: Any) -> list[Cell]:
    blocks = grid if isinstance(grid, list) else [grid]
    if not blocks or not all(isinstance(b, dict) and b for b in blocks):
        _fail(
            path,
            "grid",
            "must be a mapping of axes (or a list of such mappings), each axis a mapping of "
            "value names to override sets",
        )
    cells: list[Cell] = []
    for b, block in enumerate(blocks):
        where = f"grid[{b}]" if isinstance(grid, list) else "grid"
        axes = []
        for axis, values in block.items():
            if not isinstance(values, dict) or not values:
                _fail(path, f"{where}.{axis}", "must map value names to override sets, e.g. {qsgd4: [key=value]}")
            for vname in values:
                if not isinstance(vname, str) or not _NAME.match(vname):
                    _fail(path, f"{where}.{axis}", f"value name {vname!r} must be letters, digits, '_', '.' or '-'")
            axes.append((axis, [(v, _overrides(path, f"{where}.{axis}.{v}", s)) for v, s in values.items()]))
        for combo in itertools.product(*(vals for _, vals in axes)):
            cid = "+".join(v for v, _ in combo)
            if any(c.id == cid for c in cells):
                _fail(path, where, f"cell {cid!r} appears twice; cell ids (value names joined by '+') must be unique")
            cells.append(
                Cell(cid, {a: v for (a, _), (v, _) in zip(axes, combo)}, tuple(s for _, sets in combo for s in sets))
            )
    return cells


def load_spec(path: str | Path, quick: bool = False) -> Spec:
    """The checked spec; with ``quick`` its ``quick`` section applied. Every run's config is
    resolved and checked here, so a bad override fails before anything runs."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"spec {path}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec {path}: must hold a mapping at the top level")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        _fail(path, unknown[0], f"unknown key; allowed keys: {', '.join(SPEC_KEYS)}")
    for key in ("base", "steps", "seeds", "grid"):
        if key not in data:
            _fail(path, key, "missing (required: base, steps, seeds, grid)")
    quick_sec = data.get("quick")
    extra_set: tuple[str, ...] = ()
    keep = None
    if quick:
        if not isinstance(quick_sec, dict):
            _fail(path, "quick", "--quick needs a quick: section (cells, seeds, steps, ...)")
        bad = sorted(set(quick_sec) - set(QUICK_KEYS))
        if bad:
            _fail(path, f"quick.{bad[0]}", f"unknown key; allowed keys: {', '.join(QUICK_KEYS)}")
        extra_set = _overrides(path, "quick.set", quick_sec.get("set"))
        keep = _names(path, "quick.cells", quick_sec["cells"]) if "cells" in quick_sec else None
        data = {**data, **{k: v for k, v in quick_sec.items() if k not in ("cells", "set")}}
    elif quick_sec is not None and not isinstance(quick_sec, dict):
        _fail(path, "quick", f"{quick_sec!r} must be a mapping")

    base = data["base"]
    if not isinstance(base, dict) or "config" not in base or set(base) - {"config", "set"}:
        _fail(path, "base", "must be a mapping with config: FILE and optionally set: [key=value, ...]")
    base_config = Path(base["config"]) if Path(str(base["config"])).is_absolute() else ROOT / str(base["config"])
    if not base_config.is_file():
        _fail(path, "base.config", f"{str(base['config'])!r} is not a file (relative paths start at {ROOT})")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(path, "name", f"{name!r} must be letters, digits, '_', '.' or '-'")
    seeds = data["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or len(set(map(str, seeds))) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        _fail(path, "seeds", f"{seeds!r} must be a non-empty list of distinct integers >= 0")
    rates = data.get("rates", ["uncapped"])
    if (
        not isinstance(rates, list)
        or not all(isinstance(r, str) and _RATE.match(r) for r in rates)
        or len(set(rates)) != len(rates)
    ):
        _fail(path, "rates", f"{rates!r} must be a list of distinct link rates like uncapped, 1gbit, 100mbit")
    timing = data.get("timing") or {}
    if not isinstance(timing, dict) or set(timing) - {"steps", "warmup"}:
        _fail(path, "timing", f"{timing!r} must be a mapping with steps and/or warmup")
    t_steps = _int(path, "timing.steps", timing.get("steps", 40), 2)
    t_warmup = _int(path, "timing.warmup", timing.get("warmup", min(10, t_steps // 2)), 0)
    if t_warmup >= t_steps:
        _fail(path, "timing.warmup", f"{t_warmup} must be below timing.steps {t_steps}")
    tol = data.get("target_tolerance", 0.0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        _fail(path, "target_tolerance", f"{tol!r} must be a number (Delta_m% points)")
    timeout = data.get("run_timeout_s", 900)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        _fail(path, "run_timeout_s", f"{timeout!r} must be a positive number of seconds")
    label = data.get("versus_label", "")
    if not isinstance(label, str):
        _fail(path, "versus_label", f"{label!r} must be a string")

    cells = _cells(path, data["grid"])
    ids = [c.id for c in cells]
    if keep is not None:
        missing = [k for k in keep if k not in ids]
        if missing:
            _fail(path, "quick.cells", f"{missing} are not cells of the grid; cells: {', '.join(ids)}")
        cells = [c for c in cells if c.id in keep]
        ids = [c.id for c in cells]
    spec = Spec(
        path=path,
        name=name,
        base_config=base_config,
        base_set=_overrides(path, "base.set", base.get("set")) + extra_set,
        steps=_int(path, "steps", data["steps"], 1),
        eval_every=_int(path, "eval_every", data.get("eval_every", 0), 0),
        nproc=_int(path, "nproc", data.get("nproc", 2), 2),
        seeds=list(seeds),
        cells=cells,
        rates=rates,
        timing_steps=t_steps,
        timing_warmup=t_warmup,
        target_tolerance=float(tol),
        run_timeout_s=float(timeout),
        versus_label=label,
        quick=quick,
    )
    for key in ("target", "versus"):
        listed = _names(path, key, data.get(key, []))
        # under --quick a listed cell outside the subset simply has no column
        unknown = [c for c in listed if c not in ids and (keep is None or c in keep)]
        if unknown:
            _fail(path, key, f"{unknown} are not cells of the grid; cells: {', '.join(ids)}")
        setattr(spec, key, [c for c in listed if c in ids])
    spec.versus_label = spec.versus_label or ", ".join(spec.versus)
    for cell in spec.cells:
        for seed in spec.seeds:
            try:
                spec.config(cell, seed)
            except config_mod.ConfigError as exc:
                where = "base.set" if not cell.overrides else f"the overrides of cell {cell.id}"
                raise SpecError(f"spec {path}: {where}: config refused: {exc}") from None
    return spec


# --------------------------------------------------------------------------------- the runs
def _clean_env() -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DIST_SOUP_THREADS="1",
        DIST_SOUP_COMPILE="0",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


class _Stopped(BaseException):
    """SIGTERM / SIGHUP: stop the running job, keep what is finished."""


def _wait(proc: subprocess.Popen, timeout: float) -> int | str:
    """The exit code, or why the job was stopped; its whole session goes either way."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no exit within run_timeout_s {timeout:g} s"
    finally:
        if proc.poll() is None:
            e2e_hosts._kill(proc)


def quality_run(spec: Spec, out: Path, cell: Cell, seed: int) -> str | None:
    """Train (cell, seed) on ``spec.nproc`` local processes; None when it finished, else the error."""
    rd = run_dir(out, cell, seed)
    if rd.exists():
        shutil.rmtree(rd)  # unfinished or of another config: the run is deterministic, start afresh
    rd.parent.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{cell.id}.seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "dist_soup",
        "train",
        "--config",
        str(spec.base_config),
        "--nproc",
        str(spec.nproc),
        "--run-dir",
        str(rd),
    ]
    for s in spec.overrides(cell, seed):
        cmd += ["--set", s]
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_clean_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        rc = _wait(proc, spec.run_timeout_s)
    if rc == 0 and finished(spec, out, cell, seed):
        return None
    tail = e2e_hosts._tail(log, 1500).strip().splitlines()
    return f"{rc if isinstance(rc, str) else f'exit {rc}'}: {tail[-1] if tail else ''} (log {log})"


def _timing_key(spec: Spec, cell: Cell, rate: str, loopback: bool, eager: bool) -> str:
    """What a timing result depends on: the job's config, its length, the hosts and the link."""
    cfg = config_mod.from_dict(
        config_mod.apply_overrides(
            config_mod.to_dict(spec.config(cell, spec.seeds[0])), [f"train.steps={spec.timing_steps}"]
        )
    )
    blob = {
        "config": config_mod.fingerprint(cfg),
        "steps": spec.timing_steps,
        "warmup": spec.timing_warmup,
        "hosts": spec.nproc,
        "rate": rate,
        "loopback": loopback,
        "eager": eager,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def write_timing_config(spec: Spec, out: Path, cell: Cell) -> Path:
    """The cell's resolved config (first seed) as a complete file for the timing job."""
    path = out / "configs" / f"{cell.id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_mod.dump(spec.config(cell, spec.seeds[0])))
    return path


def timing_runs(
    spec: Spec, out: Path, rate: str, cells: list[Cell], loopback: bool, args: argparse.Namespace, log=print
) -> int:
    """Time every one of ``cells`` not yet timed at ``rate``; the number of failures."""
    todo = []
    for cell in cells:
        key = _timing_key(spec, cell, rate, loopback, args.eager)
        try:
            done = json.loads(timing_file(out, rate, cell).read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("key") == key and not done.get("error"):
            continue
        todo.append((cell, key))
    if not todo:
        log(f"[sweep] timing {rate}: every cell already timed")
        return 0
    argv = [
        "--rate",
        rate,
        "--hosts",
        str(spec.nproc),
        "--steps",
        str(spec.timing_steps),
        "--warmup",
        str(spec.timing_warmup),
        "--prefix",
        args.prefix,
        "--subnet",
        args.subnet,
        "--port",
        str(args.port),
        "--row-timeout",
        str(spec.run_timeout_s),
    ]
    argv += ["--loopback"] if loopback else []
    argv += ["--eager"] if args.eager else []
    h_args = e2e_hosts.parse_args(argv)
    hosts = e2e_hosts.Hosts(h_args)
    workdir = out / "timing" / rate / "work"
    failures = 0
    try:
        hosts.up()
        if hosts.link:
            log(f"[sweep] timing {rate}: {hosts.link}")
        for idx, (cell, key) in enumerate(todo):
            kind = "ddp" if spec.config(cell, spec.seeds[0]).train.engine == "ddp" else "soup"
            row = e2e_hosts.RowSpec(
                cell.id, cell.id, kind, config=str(write_timing_config(spec, out, cell)), common=False
            )
            t0 = time.perf_counter()
            res = e2e_hosts.run_row(row, idx, hosts, h_args, workdir)
            fig = e2e_hosts.summarize(row, res, spec.timing_warmup, spec.timing_steps)
            fig.update(key=key, rate=rate, loopback=loopback, link=hosts.link, cell=cell.id)
            if fig.get("error"):
                failures += 1
                log(f"[sweep] timing {rate} {cell.id}: FAILED ({fig['error']})\n{fig.get('log_tail', '')[-1500:]}")
            else:
                log(
                    f"[sweep] timing {rate} {cell.id}: {fig['ms_median']:.1f} ms/step "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
            f = timing_file(out, rate, cell)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(fig, indent=1) + "\n")
    finally:
        hosts.down()
        shutil.rmtree(workdir, ignore_errors=True)
    return failures


def netns_available() -> bool:
    return (
        sys.platform.startswith("linux")
        and os.geteuid() == 0
        and shutil.which("ip") is not None
        and shutil.which("tc") is not None
    )


# ---------------------------------------------------------------------------------- the CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="See the module docstring for the spec format."
    )
    p.add_argument("spec", help="the sweep spec (YAML), e.g. benchmarks/specs/bandwidth_accuracy.yaml")
    p.add_argument("--quick", action="store_true", help="the spec's quick: subset (a few minutes)")
    p.add_argument("--out", default=None, help="output directory (default runs/sweeps/NAME[-quick])")
    p.add_argument("--list", action="store_true", help="print the cells, their overrides and config fingerprints")
    p.add_argument(
        "--cells",
        default=None,
        help="comma-separated cell ids or shell globs: run only these (e.g. 'ddp_*,ew_qsgd4'); "
        "the report still shows every cell",
    )
    p.add_argument(
        "--report-only", action="store_true", help="run nothing: results, table and plots from what is there"
    )
    p.add_argument("--no-timing", action="store_true", help="quality runs only (no timing runs)")
    p.add_argument(
        "--loopback",
        action="store_true",
        help="timing runs over 127.0.0.1 even where namespaces can be made (capped rates then skipped)",
    )
    p.add_argument(
        "--eager", action="store_true", help="timing runs with the codecs' eager kernels (implied by --quick)"
    )
    p.add_argument("--prefix", default="dsw", help="namespace prefix of the timing hosts (default dsw)")
    p.add_argument("--subnet", default="10.204.0", help="their subnet, three octets (default 10.204.0)")
    p.add_argument("--port", type=int, default=29710, help="rendezvous port on host 0; cell i uses PORT+i")
    args = p.parse_args(argv)
    args.eager = args.eager or args.quick
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = load_spec(args.spec, quick=args.quick)
    except SpecError as exc:
        print(f"bandwidth_accuracy: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ROOT / "runs" / "sweeps" / (spec.name + ("-quick" if args.quick else ""))
    if args.cells:
        patterns = [x for x in args.cells.split(",") if x]
        bad = [x for x in patterns if not any(fnmatch.fnmatch(c.id, x) for c in spec.cells)]
        if bad:
            print(
                f"bandwidth_accuracy: error: --cells: no cell matches {bad}; cells: "
                f"{', '.join(c.id for c in spec.cells)}",
                file=sys.stderr,
            )
            return 2
        cells = [c for c in spec.cells if any(fnmatch.fnmatch(c.id, x) for x in patterns)]
    else:
        cells = list(spec.cells)
    if args.list:
        for cell in cells:
            cfg = spec.config(cell, spec.seeds[0])
            print(
                f"{cell.id}: {' '.join(cell.overrides) or '(base config)'}  "
                f"[engine {cfg.train.engine}, config {config_mod.fingerprint(cfg)[:12]} at seed {spec.seeds[0]}]"
            )
        print(f"{len(cells)} cells x {len(spec.seeds)} seeds, rates {', '.join(spec.rates) or 'none'}; out {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.path, out / "spec.yaml")

    def on_signal(signum, _frame):
        raise _Stopped(f"stopped by signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    failures: list[str] = []
    interrupted = None
    t_start = time.perf_counter()
    machine = e2e_hosts.machine_info()
    try:
        if not args.report_only:
            runs = [(c, s) for c in cells for s in spec.seeds]
            for i, (cell, seed) in enumerate(runs, 1):
                if finished(spec, out, cell, seed):
                    print(f"[sweep] {i}/{len(runs)} {cell.id} seed {seed}: done before, kept", flush=True)
                    continue
                t0 = time.perf_counter()
                err = quality_run(spec, out, cell, seed)
                status = f"FAILED: {err}" if err else "done"
                print(
                    f"[sweep] {i}/{len(runs)} {cell.id} seed {seed}: {status} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                if err:
                    failures.append(f"{cell.id} seed {seed}: {err}")
            if not args.no_timing and spec.rates:
                netns = netns_available() and not args.loopback
                for rate in spec.rates:
                    if rate != "uncapped" and not netns:
                        print(
                            f"[sweep] timing {rate}: needs network namespaces (root, iproute2) and not "
                            f"--loopback; not measured",
                            flush=True,
                        )
                        continue
                    n = timing_runs(
                        spec, out, rate, cells, loopback=not netns, args=args, log=lambda m: print(m, flush=True)
                    )
                    failures += [f"timing {rate}: {n} cell(s) failed"] if n else []
    except (KeyboardInterrupt, _Stopped) as exc:
        interrupted = str(exc) or type(exc).__name__
        print(f"\n[sweep] interrupted ({interrupted}); finished runs are kept, a rerun continues", flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    machine["loadavg_end"] = list(os.getloadavg())
    setup = {
        "spec": str(spec.path),
        "name": spec.name,
        "quick": spec.quick,
        "out": str(out),
        "command": " ".join(
            [
                Path(sys.argv[0]).name if argv is None else "bandwidth_accuracy.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "wall_s": time.perf_counter() - t_start,
        "interrupted": interrupted,
        "failures": failures,
    }
    paths = sweep_report.write(spec, out, setup, machine)
    print(f"[sweep] wrote {', '.join(str(p) for p in paths)}", flush=True)
    for f in failures:
        print(f"[sweep] failed: {f}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
