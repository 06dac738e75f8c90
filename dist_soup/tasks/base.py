"""What a built-in task is: a model with a shared trunk, K named objectives, data, metrics.

The training loop (``dist_soup.train``) owns sampling: it draws example indices with a
seeded, rank-sharded permutation and asks the task for ``batch(indices)``, so a task holds no
loader state and resume only needs the sampler position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Metric:
    """How one objective is scored on held-out data."""

    name: str  # e.g. "accuracy", "token_error_rate", "bleu"
    higher_is_better: bool


class Task(ABC):
    """A multi-objective problem. Subclasses set the class attributes and implement the methods.

    ``objectives`` is the ordered list of objective names (the order of the Jacobian rows).
    ``groups`` names subsets used by recipes (e.g. ``{"asr": (...), "st": (...), "ssl": (...)}``).
    ``shared`` is the dotted attribute path of the shared trunk inside the model built by
    ``build_model``; per-objective heads live elsewhere in the model and are never candidates
    for layer selection.
    """

    name: str
    objectives: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    metrics: dict[str, Metric]
    shared: str
    #: Named orders of ``groups`` for the multilevel recipe (a config's ``recipe.order`` may
    #: name one), first level first; the first is the default.
    level_orders: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: The group that the constrained recipe (vc) turns into a penalty level, if any.
    constraint_group: ClassVar[str | None] = None

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model, identical for the same seed on every rank."""

    @abstractmethod
    def train_size(self) -> int:
        """Number of training examples (indices ``0 .. train_size()-1``)."""

    @abstractmethod
    def batch(self, indices: torch.Tensor) -> Any:
        """The training batch made of these example indices."""

    @abstractmethod
    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """One scalar loss per objective, keyed by objective name (all of ``objectives``)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The metric of every objective on held-out data, keyed by objective name."""


def delta_m(
    metrics: dict[str, float], baselines: dict[str, float], task: Task, objectives: tuple[str, ...] | None = None
) -> float:
    """Delta_m% = (100/K) sum_k (-1)^{delta_k} (M_k - B_k) / B_k over ``objectives``
    (default: all of the task's).

    delta_k = 1 when higher is better for objective k, so a positive Delta_m% is a loss of
    quality against the single-task baselines and a negative one a gain.
    """
    objectives = tuple(task.objectives if objectives is None else objectives)
    missing = [k for k in objectives if k not in metrics or k not in baselines]
    if missing:
        raise ValueError(f"delta_m needs metrics and baselines for every objective; missing {missing}")
    total = 0.0
    for k in objectives:
        sign = -1.0 if task.metrics[k].higher_is_better else 1.0
        base = baselines[k]
        if base == 0:
            raise ValueError(f"baseline of objective {k!r} is 0: Delta_m% is undefined")
        total += sign * (metrics[k] - base) / abs(base)
    return 100.0 * total / len(objectives)
