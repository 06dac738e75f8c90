"""Step time of the soup step over plain unitary scalarization, with torchjd as the anchor.

    python benchmarks/moo_overhead.py [--ks 4 8] [--steps 15] [--engine-steps 100] [--quality-steps 300] [--seeds 8]

Model: a 2.6M-parameter MLP trunk (1024 -> 1024 -> 1024 -> 512, ReLU) with K linear heads,
batch 64, one CPU thread, one process. Per K it times the mean step (the cadence rows over a
whole probe period, so solve and probe steps are charged at their true rate):

  plain      sum of the K losses, one backward, optimizer step (the baseline, 1.00x)
  torchjd    torchjd's Jacobian descent with MGDA (mtl_backward + jac_to_grad): the anchor
  full           SoupEngine, MGDA on the Jacobian of every trunk tensor at every step
  defaults       SoupEngine's selection and cadence defaults, identity wire (one process:
                 nothing travels, so this is the multi-objective overhead alone)
  defaults+qsgd  all defaults, QSGD 4-bit encode and decode of J and the update included
  threshold      Objective Soups' layer selection (score < 0, probe every 100), default cadence

Then quality: multidigits (left/right/sum/parity) trained with `full` and with `defaults` for
the same number of steps; test accuracy per objective and Delta_m% against the plain sum.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dist_soup import SoupEngine


class Trunk(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(512, 10) for _ in range(k))

    def forward(self, x):
        h = self.trunk(x)
        return h, [head(h) for head in self.heads]


IDENTITY = dict(jacobian_compressor="identity", update_compressor="identity")
SETTINGS = {
    # MGDA on the Jacobian of every trunk tensor at every step, nothing compressed
    "full": dict(selection={"rule": "all"}, solve_every=1, **IDENTITY),
    # the engine's selection and cadence defaults; one process has no wire, so this row is the
    # multi-objective overhead alone
    "defaults": dict(IDENTITY),
    # everything default, QSGD 4-bit encode+decode of J and the update included
    "defaults+qsgd": {},
    # Objective Soups' selection rule (conflict score < 0, probe every 100 steps), default cadence
    "threshold": dict(selection={"rule": "threshold", "tau": 0.0}, **IDENTITY),
}


def batch(k: int, step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(64, 1024, generator=g), torch.randint(0, 10, (64, k), generator=g)


def losses_of(model, x, y):
    h, outs = model(x)
    return h, [nn.functional.cross_entropy(o, y[:, i]) for i, o in enumerate(outs)]


def time_steps(step_fn, steps: int, warmup: int = 3) -> float:
    """Mean seconds per step over ``steps`` steps after ``warmup``.

    The mean, not the median: the soup step is cheap between solves and expensive on solve
    and probe steps, and only the mean charges those at their true rate. The engine rows run
    a whole number of probe periods (see ``main``), so their mean is the amortized cost.
    """
    for s in range(warmup):
        step_fn(s)
    t = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step_fn(s)
    return (time.perf_counter() - t) / steps


def bench_k(k: int, steps: int, engine_steps: int) -> dict[str, float]:
    out = {}
    torch.manual_seed(0)

    model = Trunk(k)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def plain(s):
        x, y = batch(k, s)
        _, ls = losses_of(model, x, y)
        opt.zero_grad()
        sum(ls).backward()
        opt.step()

    out["plain"] = time_steps(plain, steps)

    try:
        from torchjd.aggregation import MGDA
        from torchjd.autojac import jac_to_grad, mtl_backward

        agg = MGDA()
        shared = list(model.trunk.parameters())

        def torchjd_step(s):
            x, y = batch(k, s)
            h, ls = losses_of(model, x, y)
            opt.zero_grad()
            mtl_backward(ls, h)
            jac_to_grad(shared, agg)
            opt.step()

        out["torchjd"] = time_steps(torchjd_step, steps)
    except ImportError:
        out["torchjd"] = float("nan")

    names = [f"t{i}" for i in range(k)]
    for label, kw in SETTINGS.items():
        engine = SoupEngine(model, opt, names, "trunk", "vs", **kw)

        def soup(s, engine=engine):
            x, y = batch(k, s)
            _, ls = losses_of(model, x, y)
            engine.step(dict(zip(names, ls)))

        # the timed steps 3..102 hold one probe (step 100) and a whole number of solves for
        # cadences 10, 20, 25 and 50; the warm-up also takes the codecs' compile out of the timing
        out[label] = time_steps(soup, engine_steps if label != "full" else steps)
    return out


def quality(steps: int, seeds: int) -> dict[str, dict]:
    from dist_soup import tasks
    from dist_soup.tasks.base import delta_m

    task = tasks.build("multidigits", objectives=("left", "right", "sum", "parity"))
    results = {}
    settings = {"plain sum": None, **SETTINGS}
    for label, kw in settings.items():
        runs, elapsed = [], 0.0
        for seed in range(seeds):
            model = task.build_model(seed)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            engine = None if kw is None else SoupEngine(model, opt, task.objectives, task.shared, "vs", seed=seed, **kw)
            gen = torch.Generator().manual_seed(1000 + seed)
            t0 = time.perf_counter()
            for _ in range(steps):
                losses = task.losses(model, task.batch(torch.randint(0, task.train_size(), (64,), generator=gen)))
                if engine is None:
                    opt.zero_grad()
                    sum(losses.values()).backward()
                    opt.step()
                else:
                    engine.step(losses)
            elapsed += time.perf_counter() - t0
            with torch.no_grad():
                runs.append(task.evaluate(model))
        mean = {k: sum(r[k] for r in runs) / seeds for k in task.objectives}
        results[label] = {"metrics": mean, "time_s": elapsed / seeds}
    base = results["plain sum"]["metrics"]
    for label in SETTINGS:
        results[label]["delta_m"] = delta_m(results[label]["metrics"], base, task)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=15, help="timed steps of plain, torchjd and full")
    ap.add_argument("--engine-steps", type=int, default=100, help="timed steps of the cadence rows (a probe period)")
    ap.add_argument("--quality-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=8, help="quality: mean over this many seeds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import inspect

    params = inspect.signature(SoupEngine.__init__).parameters
    shown = ("gram", "selection", "probe_every", "solve_every", "jacobian_compressor", "update_compressor", "mode")
    print("engine defaults: " + ", ".join(f"{k}={params[k].default!r}" for k in shown))
    cols = ("torchjd", *SETTINGS)
    print(f"{'K':>3} {'plain ms':>9} " + " ".join(f"{c:>15}" for c in cols) + "   (ms, ratio to plain)")
    for k in args.ks:
        r = bench_k(k, args.steps, args.engine_steps)
        base = r["plain"]
        cells = " ".join(f"{r[n] * 1e3:8.1f} {r[n] / base:5.2f}x" for n in cols)
        print(f"{k:>3} {base * 1e3:9.1f} {cells}")
        if k == 8:
            ratio = r["defaults"] / base
            print(f"    target: defaults <= 1.5x plain at K=8: {ratio:.2f}x, {'met' if ratio <= 1.5 else 'missed'}")
    if args.quality_steps:
        print(
            f"\nquality: multidigits (left, right, sum, parity), {args.quality_steps} steps, batch 64, Adam 2e-3, "
            f"test accuracy, mean of {args.seeds} seeds; delta_m against the plain sum (negative is better)"
        )
        q = quality(args.quality_steps, args.seeds)
        for label, r in q.items():
            m = " ".join(f"{k}={v:.3f}" for k, v in r["metrics"].items())
            dm = f" delta_m={r['delta_m']:+.2f}%" if "delta_m" in r else ""
            print(f"  {label:<10} {m}{dm} ({r['time_s']:.1f} s)")


if __name__ == "__main__":
    main()
