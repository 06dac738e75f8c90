"""Built-in tasks and their registry.

``build(name, **options)`` makes a task by name; ``names()`` lists the registered names. Each
task class takes keyword-only options with defaults; an unknown name or option is a ValueError
listing what is allowed. Task modules are imported on first use, so importing
``dist_soup.tasks`` stays cheap (scikit-learn is only loaded for ``multidigits``).

Built-in: ``toy2`` (:class:`~dist_soup.tasks.toy2.Toy2Task`), ``multidigits``
(:class:`~dist_soup.tasks.multidigits.MultiDigits`), ``msp_synth``
(:class:`~dist_soup.tasks.msp_synth.MSPSynth`). The registry is :class:`dist_soup._registry.Registry`,
as for codecs and solvers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from .._registry import Registry, keyword_options
from .base import Metric, Task, delta_m

__all__ = ["Metric", "Task", "build", "delta_m", "names", "options", "register", "task_class"]

TASKS: Registry[Task] = Registry(
    "task",
    Task,
    {
        "msp_synth": "dist_soup.tasks.msp_synth:MSPSynth",
        "multidigits": "dist_soup.tasks.multidigits:MultiDigits",
        "toy2": "dist_soup.tasks.toy2:Toy2Task",
    },
)
names = TASKS.names
#: Add a user task class under a name (its ``__init__`` takes keyword options).
register = TASKS.register
#: The class registered under a name (importing its module if needed).
task_class = TASKS.get
#: The options a task accepts, with their default values.
options = TASKS.options
#: Make a task by name with these options (unknown options raise ValueError).
build = TASKS.build


# Option checks shared by the task modules: a clear ValueError naming the option and the range.


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"option {name!r} must be an int, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(
            f"option {name!r} must be in [{lo if lo is not None else '-inf'}, "
            f"{hi if hi is not None else 'inf'}], got {value}"
        )
    return value


def _check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"option {name!r} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(
            f"option {name!r} must be in [{lo if lo is not None else '-inf'}, "
            f"{hi if hi is not None else 'inf'}], got {value}"
        )
    return float(value)


def _check_indices(indices: Any, size: int) -> torch.Tensor:
    """A 1-D int64 CPU tensor of example ids in [0, size)."""
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(
            f"batch indices must be a non-empty 1-D integer tensor, got dtype {idx.dtype} shape {tuple(idx.shape)}"
        )
    idx = idx.to(device="cpu", dtype=torch.long)
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(f"batch indices must lie in [0, {size}), got min {int(idx.min())} max {int(idx.max())}")
    return idx


def _changed_options(task: Task) -> set[str]:
    """Names of the options of ``task`` that differ from their defaults (each option is stored
    as the attribute of the same name)."""
    return {k for k, v in keyword_options(type(task)).items() if getattr(task, k) != v}


def _lookup_baselines(task: Task, table: dict[tuple, dict[str, float]], ignore: set[str]) -> dict[str, float]:
    """The stored single-task baselines of ``task``'s objectives, or {} when none were measured.

    ``table`` maps the options that differ from their defaults, as sorted ``(name, value)``
    pairs, to one metric per objective; the options in ``ignore`` do not change the numbers
    (e.g. the data seed: another sample of the same distribution).
    """
    key = tuple(sorted((k, getattr(task, k)) for k in _changed_options(task) - ignore))
    found = table.get(key, {})
    return {k: found[k] for k in task.objectives if k in found}


M = TypeVar("M", bound=nn.Module)


def _seeded_init(seed: int, make: Callable[[], M]) -> M:
    """``make()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    _check_int("seed", seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
