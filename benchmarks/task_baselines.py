"""Single-task baselines of the built-in tasks, for Delta_m%.

Trains each objective of a task alone (only its loss is back-propagated; the model, data and
batches are the task defaults), evaluates it on the task's held-out set, and prints the dict of
metrics that the task module stores as ``baselines``. With ``--joint`` it also trains the plain
sum of all losses (equal weights) under the same protocol and prints its metrics and Delta_m%.

Protocol: ``build_model(model_seed)``, Adam, ``--steps`` steps of ``--batch`` examples drawn
uniformly with replacement from a torch.Generator seeded by the model seed; the metric is the
mean over ``--seeds`` model seeds. One thread (``torch.set_num_threads(1)``). The defaults
(200 steps of 32 examples, lr 3e-3) are the budget of configs/quickstart.yaml (200 steps, 2 ranks
x 16 examples), so Delta_m% of a quickstart run compares like with like.

    python benchmarks/task_baselines.py --task msp_synth
    python benchmarks/task_baselines.py --task multidigits --joint
    python benchmarks/task_baselines.py --task multidigits --option objectives=[left,right,sum,parity]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from dist_soup import tasks


def train(
    task: tasks.Task, objectives: tuple[str, ...], *, seed: int, steps: int, batch: int, lr: float
) -> tuple[dict[str, float], float]:
    """Train on the sum of ``objectives``' losses; return (held-out metrics, seconds per step)."""
    model = task.build_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, task.train_size(), (batch,), generator=gen)
        losses = task.losses(model, task.batch(idx))
        opt.zero_grad(set_to_none=True)
        sum(losses[k] for k in objectives).backward()
        opt.step()
    per_step = (time.perf_counter() - start) / steps
    return task.evaluate(model), per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="msp_synth", choices=["msp_synth", "multidigits"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--joint", action="store_true", help="also train the equal-weight sum")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (YAML value), e.g. --option languages=2",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option needs KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    task = tasks.build(args.task, **options)
    baselines: dict[str, float] = {}
    for k in task.objectives:
        runs = [train(task, (k,), seed=s, steps=args.steps, batch=args.batch, lr=args.lr) for s in args.seeds]
        baselines[k] = sum(m[k] for m, _ in runs) / len(runs)
        print(
            f"{k:>8s} alone: {baselines[k]:.4f}  per seed {[round(m[k], 4) for m, _ in runs]}  "
            f"{1000 * runs[0][1]:.1f} ms/step",
            flush=True,
        )
    print("options =", json.dumps(options), "| steps", args.steps, "batch", args.batch, "lr", args.lr)
    print("baselines =", json.dumps({k: round(v, 4) for k, v in baselines.items()}))
    if args.joint:
        runs = [
            train(task, task.objectives, seed=s, steps=args.steps, batch=args.batch, lr=args.lr) for s in args.seeds
        ]
        joint = {k: sum(m[k] for m, _ in runs) / len(runs) for k in task.objectives}
        print("joint (equal-weight sum) =", json.dumps({k: round(v, 4) for k, v in joint.items()}))
        print(f"Delta_m% of the joint model = {tasks.delta_m(joint, baselines, task):+.2f}")


if __name__ == "__main__":
    main()
