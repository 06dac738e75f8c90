"""Recipes (Objective Soups): ordered levels of objectives, each with a solver and a penalty.

A recipe is a list of levels ``j``; level j holds a group of objectives ``O_j`` (disjoint
across levels), a solver and a weight schedule ``eta_j(t)`` (see :class:`Schedule`: t counts
epochs, optimizer steps or the fraction of the run). Each level's solver
sees only the sub-Gram and losses of its own objectives and returns ``lambda^j`` (|O_j|
weights), which is embedded into the K objectives (zeros elsewhere). The final weights are

    ``w = sum_j eta_j(t) * lambda^j``

and the update direction is ``J^T w``; the same ``w`` weights the losses of every layer.

* VS (single level): all objectives in one MOO level.
* VC (constrained): the supervised objectives in one MOO level (eta = 1), the constraint
  group (e.g. a self-supervised group) as a penalty level summed with ``ew`` and weight
  ``eta(t) = min(cap, start + step t)``, default 0.1 + 0.02 t capped at 1.5 (the paper's code).
* VM (multilevel): one MOO level per group, in a given order (e.g. ASR, then ST, then SSL);
  level 0 has eta = 1, later levels the ramp schedule.

Which groups a task has, and its named orders, belong to the task (``Task.level_orders``,
``Task.constraint_group``); this module takes group names.

The engine tells the recipe where the run is by one number, the (fractional) epoch
``step / steps_per_epoch``. A schedule in steps or in fractions of the run needs the run
length to read that number: :meth:`Recipe.set_run_length` gives it ``steps_per_epoch`` (the
engine's) and ``total_steps`` (``train.steps``), and ``dist_soup.train`` calls it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import solvers as solver_registry
from .gram import check_finite
from .solvers import Solver

__all__ = ["Schedule", "Level", "Recipe", "build_recipe", "RECIPE_KINDS", "DEFAULT_RAMP", "SCHEDULE_UNITS"]

RECIPE_KINDS = ("vs", "vc", "vm")


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"schedule {name} must be a finite number, got {value!r}")
    return float(value)


#: What the schedule's ``t`` counts (see :class:`Schedule`).
SCHEDULE_UNITS = ("epochs", "steps", "fraction")
_SCHEDULE_KEYS = ("start", "step", "cap", "unit", "every")
# Positions come from floats (epoch = step / steps_per_epoch, t / every); a value this close to
# an integer is that integer, so that a staircase does not lose a stair to rounding.
_SNAP = 1e-9


def _snap_floor(x: float) -> float:
    r = round(x)
    return float(r) if abs(x - r) <= _SNAP * max(1.0, abs(x)) else float(math.floor(x))


@dataclass(frozen=True)
class Schedule:
    """A penalty weight ``eta(t) >= 0`` that ramps linearly or by stairs.

    ``eta(t) = min(cap, max(0, start + step * t))``              when ``every`` is None;
    ``eta(t) = min(cap, max(0, start + step * floor(t / every)))``  otherwise,

    (no cap when ``cap`` is None), where ``t`` counts ``unit``:

    * ``epochs`` (default): the fractional epoch the engine passes, ``step / steps_per_epoch``.
    * ``steps``: optimizer steps done before this one, ``round(epoch * steps_per_epoch)``.
    * ``fraction``: the fraction of the run done, ``steps / total_steps`` (0 at the first step,
      ``(T-1)/T`` at the last), so ``{start: 0.1, step: 1.4, unit: fraction}`` ramps from 0.1
      to 1.5 over the whole run whatever its length.

    So ``step`` is the increase per unit (linear) or per stair of ``every`` units:
    ``{start: 0.1, step: 0.02, every: 10, unit: steps}`` adds 0.02 every 10 steps, and
    ``{start: 0.1, step: 0.02, every: 1}`` is the paper's code's per-epoch staircase, where the
    default (``every`` None) ramps within the epoch. ``steps`` and ``fraction`` need the run
    length in :meth:`value` (``steps_per_epoch``; ``fraction`` also ``total_steps``).
    """

    start: float = 1.0
    step: float = 0.0
    cap: float | None = None
    unit: str = "epochs"
    every: float | None = None

    def __post_init__(self) -> None:
        # A negative weight would ascend its objectives: start and cap must be >= 0; a negative
        # step (a decaying weight) is clamped at 0 in value().
        if _finite("start", self.start) < 0:
            raise ValueError(f"schedule start must be >= 0, got {self.start!r}")
        _finite("step", self.step)
        if self.cap is not None and _finite("cap", self.cap) < 0:
            raise ValueError(f"schedule cap must be >= 0, got {self.cap!r}")
        if self.unit not in SCHEDULE_UNITS:
            raise ValueError(f"schedule unit {self.unit!r} is not allowed; use one of {', '.join(SCHEDULE_UNITS)}")
        if self.every is not None:
            every = _finite("every", self.every)
            if every <= 0:
                raise ValueError(f"schedule every must be > 0 (units per stair), got {self.every!r}")
            if self.unit == "steps" and every != int(every):
                raise ValueError(f"schedule every must be a whole number of steps with unit steps, got {self.every!r}")
            if self.unit == "fraction" and every > 1:
                # t stays below 1, so a stair longer than the run would never be climbed.
                raise ValueError(f"schedule every must be in (0, 1] with unit fraction, got {self.every!r}")

    @property
    def needs(self) -> tuple[str, ...]:
        """The run-length numbers :meth:`value` needs for this unit."""
        return {"epochs": (), "steps": ("steps_per_epoch",), "fraction": ("steps_per_epoch", "total_steps")}[self.unit]

    def position(self, epoch: float, *, steps_per_epoch: int | None = None, total_steps: int | None = None) -> float:
        """``t`` in this schedule's unit at the engine's fractional ``epoch``."""
        e = _finite("epoch", epoch)
        if e < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        if self.unit == "epochs":
            return e
        if steps_per_epoch is None or (self.unit == "fraction" and total_steps is None):
            raise ValueError(
                f"a schedule in unit {self.unit!r} needs the run length ({', '.join(self.needs)}); "
                "pass it to Recipe.set_run_length"
            )
        steps = e * steps_per_epoch
        r = round(steps)
        steps = float(r) if abs(steps - r) <= _SNAP * max(1.0, steps) else steps
        if self.unit == "steps":
            return steps
        assert total_steps is not None  # checked above
        return steps / total_steps

    def value(self, epoch: float, *, steps_per_epoch: int | None = None, total_steps: int | None = None) -> float:
        """``eta`` at the engine's fractional ``epoch`` (run length as in :meth:`position`)."""
        t = self.position(epoch, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        if self.every is not None:
            t = _snap_floor(t / self.every)
        v = max(0.0, self.start + self.step * t)
        return v if self.cap is None else min(self.cap, v)

    @classmethod
    def from_spec(cls, spec: Any) -> Schedule:
        """A Schedule from a number (constant), a mapping (start, step, cap, unit, every) or a
        Schedule."""
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(_SCHEDULE_KEYS))
            if unknown:
                raise ValueError(f"schedule got unknown keys {unknown}; allowed: {', '.join(_SCHEDULE_KEYS)}")
            return cls(**dict(spec))
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(start=float(spec))
        raise ValueError(f"a schedule is a number or a mapping with {', '.join(_SCHEDULE_KEYS)}, got {spec!r}")


DEFAULT_RAMP = Schedule(start=0.1, step=0.02, cap=1.5)


@dataclass(frozen=True)
class Level:
    """One level: objectives, the solver and the weight schedule ``eta``.

    ``solver`` is a name with ``solver_options`` (``"mgda", {"momentum": 0.9}``) or a
    :class:`~dist_soup.moo.solvers.Solver` object (``MGDA(momentum=0.9)``), which serves as the
    prototype: each recipe made from the level solves with its own copy, so levels and recipes
    never share solver state. ``penalty`` marks a constraint level (VC); it changes nothing in
    the arithmetic, it is reported in the recipe's info.
    """

    objectives: tuple[str, ...]
    solver: str | Solver
    solver_options: dict[str, Any] = field(default_factory=dict)
    eta: Schedule = field(default_factory=Schedule)
    penalty: bool = False

    def __post_init__(self) -> None:
        objs = self.objectives
        if isinstance(objs, str) or not all(isinstance(o, str) for o in objs):
            raise ValueError(f"level objectives must be a tuple of names, got {objs!r}")
        object.__setattr__(self, "objectives", tuple(objs))
        if not self.objectives:
            raise ValueError("a level needs at least one objective")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"level lists an objective twice: {self.objectives}")
        if isinstance(self.solver, str):
            solver_registry.solver_class(self.solver)  # unknown solver: ValueError now
        elif not isinstance(self.solver, Solver):
            raise TypeError(f"a level's solver is a name or a Solver, got {type(self.solver).__name__}")
        elif self.solver_options:
            raise ValueError("solver_options go with a solver name; a Solver object carries its own options")
        if not isinstance(self.eta, Schedule):
            object.__setattr__(self, "eta", Schedule.from_spec(self.eta))
        object.__setattr__(self, "solver_options", dict(self.solver_options or {}))

    @property
    def solver_name(self) -> str:
        return self.solver if isinstance(self.solver, str) else self.solver.name

    def make_solver(self) -> Solver:
        """A fresh solver for this level: built from the name, or a copy of the prototype."""
        if isinstance(self.solver, str):
            return solver_registry.build(self.solver, **self.solver_options)
        return copy.deepcopy(self.solver)


class Recipe:
    """An ordered list of levels with one solver object each (state kept across calls)."""

    def __init__(self, levels: Sequence[Level]) -> None:
        levels = list(levels)
        if not levels:
            raise ValueError("a recipe needs at least one level")
        seen: dict[str, int] = {}
        for j, level in enumerate(levels):
            if not isinstance(level, Level):
                raise TypeError(f"levels[{j}] must be a Level, got {type(level).__name__}")
            for o in level.objectives:
                if o in seen:
                    raise ValueError(f"objective {o!r} is in level {seen[o]} and level {j}; levels must be disjoint")
                seen[o] = j
        self.levels = levels
        self.solvers = [lv.make_solver() for lv in levels]
        self.steps_per_epoch: int | None = None
        self.total_steps: int | None = None

    def set_run_length(self, *, steps_per_epoch: int | None = None, total_steps: int | None = None) -> None:
        """The run length that schedules in ``steps`` and ``fraction`` read the epoch with.

        ``steps_per_epoch`` must be the one the engine divides its step count by (the epoch it
        passes is ``step / steps_per_epoch``); ``total_steps`` is the run's number of optimizer
        steps (``train.steps``). A value left None keeps the one set before. It is configuration,
        not state: a resumed run sets it again (and a resume with a larger ``train.steps``
        stretches a ``fraction`` schedule from there on).
        """
        for key, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recipe run length: {key} must be an integer >= 1, got {value!r}")
            setattr(self, key, value)

    def _check_run_length(self) -> None:
        for j, level in enumerate(self.levels):
            missing = [key for key in level.eta.needs if getattr(self, key) is None]
            if missing:
                raise ValueError(
                    f"level {j} ({', '.join(level.objectives)}): its eta schedule is in {level.eta.unit!r} "
                    f"and needs {' and '.join(missing)}; call recipe.set_run_length("
                    f"{', '.join(k + '=...' for k in missing)}) before the first step"
                )

    def _eta(self, level: Level, epoch: float) -> float:
        return level.eta.value(epoch, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)

    @property
    def objectives(self) -> tuple[str, ...]:
        """All objectives, level by level, in level order."""
        return tuple(o for lv in self.levels for o in lv.objectives)

    @property
    def needs_gram(self) -> bool:
        """Whether any level's solver uses the Gram (if not, no Jacobian is needed)."""
        return any(s.needs_gram for s in self.solvers)

    def check_names(self, names: Sequence[str]) -> None:
        """ValueError unless ``names`` is exactly the recipe's objectives (any order, no repeats)."""
        names = list(names)
        if len(set(names)) != len(names):
            raise ValueError(f"objective names repeat: {names}")
        unknown = sorted(set(names) - set(self.objectives))
        missing = sorted(set(self.objectives) - set(names))
        if unknown or missing:
            raise ValueError(
                f"objective names do not match the recipe: unknown {unknown}, missing {missing}; "
                f"recipe objectives: {list(self.objectives)}"
            )

    def etas(self, epoch: float) -> list[float]:
        """Each level's eta at the engine's fractional ``epoch``."""
        self._check_run_length()
        return [self._eta(lv, epoch) for lv in self.levels]

    def weights(
        self, gram: Tensor | None, losses: Tensor, names: Sequence[str], epoch: float
    ) -> tuple[Tensor, dict[str, Any]]:
        """``w = sum_j eta_j(epoch) lambda^j`` over the K objectives ordered as ``names``.

        ``epoch`` is the engine's fractional epoch ``step / steps_per_epoch``; schedules in steps
        or fractions of the run read it with :meth:`set_run_length`'s numbers.

        ``gram`` is (K, K) in the order of ``names`` (None is allowed when no level needs it);
        each level's solver sees its sub-Gram (projected onto the PSD cone when it needs PSD). Returns the
        float32 weights (K,) and ``info`` with ``etas`` (list of floats), ``lambdas`` (list of
        per-level float32 tensors, in level objective order) and ``levels`` (per level dict:
        objectives, solver, eta, lambda, penalty).
        """
        names = list(names)
        self.check_names(names)
        k = len(names)
        if not isinstance(losses, Tensor) or losses.shape != (k,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a tensor of shape ({k},), got {shape}")
        if gram is not None:
            if not isinstance(gram, Tensor) or gram.shape != (k, k):
                shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
                raise ValueError(f"gram must be a tensor of shape ({k}, {k}), got {shape}")
            check_finite(gram, "gram")
        elif self.needs_gram:
            raise ValueError("this recipe has a solver that needs the Gram; got gram=None")
        self._check_run_length()
        pos = {n: i for i, n in enumerate(names)}
        w = torch.zeros(k, dtype=torch.float64)
        info: dict[str, Any] = {"etas": [], "lambdas": [], "levels": []}
        for level, solver in zip(self.levels, self.solvers):
            idx = torch.tensor([pos[o] for o in level.objectives])
            sub_l = losses.detach().cpu()[idx]
            sub_g = None
            if gram is not None and solver.needs_gram:
                # the solver projects it onto the PSD cone when it needs PSD
                sub_g = gram.detach().cpu().to(torch.float64)[idx][:, idx]
            lam = solver.weights(sub_g, sub_l)
            eta = self._eta(level, epoch)
            w[idx] += eta * lam.to(torch.float64)
            info["etas"].append(eta)
            info["lambdas"].append(lam)
            info["levels"].append(
                {
                    "objectives": level.objectives,
                    "solver": level.solver_name,
                    "eta": eta,
                    "lambda": lam,
                    "penalty": level.penalty,
                }
            )
        return w.to(dtype=torch.float32, device=losses.device), info

    def state_dict(self) -> dict[str, Any]:
        return {"levels": [s.state_dict() for s in self.solvers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state) != {"levels"} or len(state["levels"]) != len(self.solvers):
            raise ValueError(f"recipe state must be {{'levels': [{len(self.solvers)} solver states]}}")
        for s, st in zip(self.solvers, state["levels"]):
            s.load_state_dict(st)

    @classmethod
    def from_levels(cls, spec: Sequence[Mapping[str, Any]]) -> Recipe:
        """A recipe from a user list: each item has ``objectives`` and ``solver`` and optionally
        ``solver_options`` (mapping), ``eta`` (number or {start, step, cap, unit, every}, see
        :class:`Schedule`), ``penalty`` (bool)."""
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
            raise ValueError("a recipe spec is a list of level mappings")
        levels = []
        allowed = {"objectives", "solver", "solver_options", "eta", "penalty"}
        for j, item in enumerate(spec):
            if not isinstance(item, Mapping):
                raise ValueError(f"level {j} must be a mapping, got {type(item).__name__}")
            unknown = sorted(set(item) - allowed)
            if unknown:
                raise ValueError(f"level {j} has unknown keys {unknown}; allowed: {sorted(allowed)}")
            for key in ("objectives", "solver"):
                if key not in item:
                    raise ValueError(f"level {j} needs key {key!r}")
            opts = item.get("solver_options") or {}
            if not isinstance(opts, Mapping):
                raise ValueError(f"level {j}: solver_options must be a mapping")
            penalty = item.get("penalty", False)
            if not isinstance(penalty, bool):
                raise ValueError(f"level {j}: penalty must be true or false, got {penalty!r}")
            objs = item["objectives"]
            if isinstance(objs, str):
                raise ValueError(f"level {j}: objectives must be a list of names, got the string {objs!r}")
            try:
                eta = Schedule.from_spec(item.get("eta", 1.0))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"level {j}: eta: {exc}") from None
            levels.append(Level(tuple(objs), item["solver"], dict(opts), eta, penalty))
        return cls(levels)

    def __repr__(self) -> str:
        parts = [f"{lv.objectives}:{lv.solver_name}" for lv in self.levels]
        return f"Recipe({', '.join(parts)})"


def build_recipe(
    kind: str,
    objectives: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    *,
    solver: str | Solver = "mgda",
    solver_options: Mapping[str, Any] | None = None,
    order: Sequence[str] | None = None,
    constraint: str | None = None,
    eta: Schedule | None = None,
) -> Recipe:
    """The recipe ``kind`` ("vs", "vc", "vm") for ``objectives`` and task ``groups``.

    ``solver``: a name with ``solver_options``, or a Solver object (each level gets its own copy).

    * ``vs``: one level, all objectives, ``solver``, eta = 1.
    * ``vc``: level 0 = objectives outside ``groups[constraint]`` with ``solver`` (eta = 1);
      level 1 = that group, solver ``ew``, ``penalty=True``, eta = ``eta`` or 0.1 + 0.02 t
      capped at 1.5.
    * ``vm``: one level per group named in ``order`` (e.g. ``("asr", "st", "ssl")``), each with
      ``solver``; groups absent from ``groups`` are skipped; level 0 has eta = 1, later levels
      ``eta`` or the default ramp. Every objective must belong to one of the ordered groups.
    """
    if kind not in RECIPE_KINDS:
        raise ValueError(f"unknown recipe kind {kind!r}; allowed: {', '.join(RECIPE_KINDS)}")
    objectives = tuple(objectives)
    if not objectives or len(set(objectives)) != len(objectives):
        raise ValueError(f"objectives must be a non-empty list of distinct names, got {list(objectives)}")
    for g, members in groups.items():
        unknown = sorted(set(members) - set(objectives))
        if unknown:
            raise ValueError(f"group {g!r} names unknown objectives {unknown}; objectives: {list(objectives)}")
    opts = dict(solver_options or {})
    ramp = eta if eta is not None else DEFAULT_RAMP
    if order is not None and kind != "vm":
        raise ValueError(f"option order is only used by recipe 'vm', not {kind!r}")
    if constraint is not None and kind != "vc":
        raise ValueError(f"option constraint is only used by recipe 'vc', not {kind!r}")
    if kind == "vs":
        return Recipe([Level(objectives, solver, opts, Schedule(1.0))])
    if kind == "vc":
        if constraint is None:
            raise ValueError("recipe 'vc' needs constraint: the name of the group of constraint objectives")
        if not groups.get(constraint):
            raise ValueError(
                f"recipe 'vc' needs a non-empty group {constraint!r} (the constraint objectives); "
                f"groups: {sorted(groups)}"
            )
        penalty = tuple(o for o in objectives if o in set(groups[constraint]))
        sup = tuple(o for o in objectives if o not in set(penalty))
        if not sup:
            raise ValueError(f"recipe 'vc' needs supervised objectives outside group {constraint!r}")
        return Recipe([Level(sup, solver, opts, Schedule(1.0)), Level(penalty, "ew", {}, ramp, penalty=True)])
    if order is None or isinstance(order, str) or not all(isinstance(g, str) for g in order):
        raise ValueError(
            f"recipe 'vm' needs order: the group names, one level each, first level first (e.g. "
            f"['asr', 'st', 'ssl']), got {order!r}"
        )
    order = tuple(order)
    levels: list[Level] = []
    covered: set[str] = set()
    for gname in order:
        members = tuple(o for o in objectives if o in set(groups.get(gname, ())))
        if not members:
            continue
        overlap = sorted(covered & set(members))
        if overlap:
            raise ValueError(f"objectives {overlap} are in more than one of the groups {order}")
        covered |= set(members)
        levels.append(Level(members, solver, opts, Schedule(1.0) if not levels else ramp))
    left = [o for o in objectives if o not in covered]
    if left:
        raise ValueError(f"recipe 'vm' {list(order)}: objectives {left} belong to none of these groups")
    return Recipe(levels)
