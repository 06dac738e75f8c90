"""What a config builds for a run: optimizer, learning-rate factor, recipe, objectives, and
the checks every rank shares (the config digest, the parameters' hash)."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from . import config as config_mod
from .config import Config, ConfigError, RecipeConfig
from .moo.recipe import Recipe, Schedule, build_recipe


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(cfg: Config, step: int) -> float:
    """The learning rate of ``step`` over ``optimizer.lr``: warm-up, then the schedule.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    o, total = cfg.optimizer, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def recipe_from_config(
    cfg: Config, task, objectives: tuple[str, ...], groups: dict, steps_per_epoch: int | None = None
) -> Recipe:
    """The config's recipe for ``task``, told the run length (``steps_per_epoch``: the
    engine's) that penalty schedules in steps or fractions of the run need."""
    recipe = recipe_from_sections(with_task_groups(cfg.recipe, task), cfg.solver, objectives, groups)
    recipe.set_run_length(steps_per_epoch=steps_per_epoch, total_steps=cfg.train.steps)
    return recipe


def with_task_groups(r: RecipeConfig, task) -> RecipeConfig:
    """``recipe:`` with the task's names resolved: ``order`` as the list of groups (a named
    order of the task, or its first order when null) and ``constraint`` as a group name (the
    task's when null), so that what remains knows nothing of the task."""
    if r.kind == "vm" and not isinstance(r.order, list):
        orders = task.level_orders
        if r.order is None and not orders:
            raise ValueError(
                f"recipe vm: task {task.name!r} names no order of its groups "
                f"{sorted(task.groups)}; give recipe.order as a list"
            )
        if r.order is not None and r.order not in orders:
            raise ValueError(
                f"recipe.order: {r.order!r} is not an order of task {task.name!r}; "
                f"its orders: {', '.join(orders) or 'none'}"
            )
        order = orders[r.order] if r.order is not None else next(iter(orders.values()))
        return dataclasses.replace(r, order=list(order))
    if r.kind == "vc" and r.constraint is None:
        if task.constraint_group is None:
            raise ValueError(
                f"recipe vc: task {task.name!r} has no constraint group; give recipe.constraint "
                f"(one of its groups {sorted(task.groups)})"
            )
        return dataclasses.replace(r, constraint=task.constraint_group)
    return r


def recipe_from_sections(r: RecipeConfig, solver, objectives: tuple[str, ...], groups: dict) -> Recipe:
    """The recipe of a ``recipe:`` and a ``solver:`` section (a run config's, with the task's
    names resolved by :func:`with_task_groups`, or the DeepSpeed plugin's)."""
    if r.kind == "custom":
        return Recipe.from_levels(r.levels or [])
    order = r.order if r.kind == "vm" else None
    return build_recipe(
        r.kind,
        objectives,
        groups,
        solver=solver.name,
        solver_options=solver.options,
        order=order,
        constraint=r.constraint,
        eta=Schedule.from_spec(vars(r.eta)),
    )


def objectives_of(cfg: Config, task) -> tuple[str, ...]:
    if cfg.task.objectives is None:
        return tuple(task.objectives)
    unknown = [k for k in cfg.task.objectives if k not in task.objectives]
    if unknown or not cfg.task.objectives:
        raise ConfigError(
            f"task.objectives: {unknown or '[]'} not allowed; the task {task.name!r} has {list(task.objectives)}"
        )
    return tuple(cfg.task.objectives)


def param_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def agree_on_config(transport, cfg: Config) -> None:
    """All ranks must run the same resolved config: compare its digest (tensors, no pickle)."""
    if transport.world_size == 1:
        return
    digest = bytes.fromhex(config_mod.fingerprint(cfg))[:8]
    word = int.from_bytes(digest, "little", signed=True)
    # one MAX all-reduce of (w, -w): every rank learns max and min of the words at once
    both = torch.tensor([word, -word], dtype=torch.int64)
    transport.all_reduce_(both, "max")
    if both[0].item() != word or -both[1].item() != word:
        raise ConfigError(
            f"rank {transport.rank}: the ranks of this run have different configs (fingerprint "
            f"{config_mod.fingerprint(cfg)[:16]} here); start every rank with the same config and --set overrides"
        )
