"""toy2: the two-objective toy problem of CAGrad (Liu et al. 2021) and Nash-MTL.

x = (x1, x2) in R^2; with ``c1 = max(tanh(x2/2), 0)`` and ``c2 = max(tanh(-x2/2), 0)``:

    f1(x) = c1 * (log max(|0.5(-x1 - 7) - tanh(-x2)|, 5e-6) + 6)
          + c2 * (((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20)
    f2(x) = c1 * (log max(|0.5(-x1 + 3) + tanh(-x2) + 2|, 5e-6) + 6)
          + c2 * (((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20)

The Pareto front is the segment x1 in [-7, 7] near x2 = -8.3552; the five standard starting
points are (-8.5, 7.5), (0, 0), (9, 9), (-7.5, -0.5), (9, -1). In the upper half the log
valleys pull methods to one end or the other; the lower half is a pair of quadratic bowls.
``scale`` multiplies f1 only (Nash-MTL's imbalanced variant), ``scale_both`` both losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Metric, Task

__all__ = ["Toy2Task", "Point", "Toy2Model", "toy2_losses", "f1", "f2", "START_POINTS", "PARETO_X2", "LOWER"]

LOWER = 5e-6
PARETO_X2 = -8.3552
START_POINTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def _parts(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not isinstance(x, Tensor) or x.shape[-1:] != (2,):
        raise ValueError(f"x must be a tensor of shape (..., 2), got {getattr(x, 'shape', type(x).__name__)}")
    x1, x2 = x[..., 0], x[..., 1]
    c1 = torch.tanh(0.5 * x2).clamp(min=0.0)
    c2 = torch.tanh(-0.5 * x2).clamp(min=0.0)
    return x1, x2, c1, c2


def f1(x: Tensor, scale: float = 1.0) -> Tensor:
    """First objective at x (shape (..., 2)), times ``scale``."""
    x1, x2, c1, c2 = _parts(x)
    upper = torch.log((0.5 * (-x1 - 7.0) - torch.tanh(-x2)).abs().clamp(min=LOWER)) + 6.0
    lower = ((-x1 + 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    return scale * (c1 * upper + c2 * lower)


def f2(x: Tensor) -> Tensor:
    """Second objective at x (shape (..., 2))."""
    x1, x2, c1, c2 = _parts(x)
    upper = torch.log((0.5 * (-x1 + 3.0) + torch.tanh(-x2) + 2.0).abs().clamp(min=LOWER)) + 6.0
    lower = ((-x1 - 7.0) ** 2 + 0.1 * (-x2 - 8.0) ** 2) / 10.0 - 20.0
    return c1 * upper + c2 * lower


def toy2_losses(x: Tensor, scale: float = 1.0, scale_both: float = 1.0) -> Tensor:
    """Both objectives stacked on the last axis: shape (..., 2)."""
    return scale_both * torch.stack([f1(x, scale), f2(x)], dim=-1)


class Point(nn.Module):
    """The shared trunk: the point x in R^2 as one parameter."""

    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float32))


class Toy2Model(nn.Module):
    """``trunk`` holds x; ``forward()`` returns the two losses (no heads, no input)."""

    def __init__(self, start: tuple[float, float], scale: float = 1.0, scale_both: float = 1.0) -> None:
        super().__init__()
        self.trunk = Point(start)
        self.scale = scale
        self.scale_both = scale_both

    def forward(self, batch: Any = None) -> Tensor:
        return toy2_losses(self.trunk.x, self.scale, self.scale_both)


class Toy2Task(Task):
    """The toy as a Task: one "example", no data; ``start`` is an index into
    :data:`START_POINTS` or an explicit pair (x1, x2)."""

    name = "toy2"
    objectives = ("f1", "f2")
    groups = {"all": ("f1", "f2")}
    metrics = {"f1": Metric("loss", higher_is_better=False), "f2": Metric("loss", higher_is_better=False)}
    shared = "trunk"

    def __init__(
        self, *, start: int | tuple[float, float] | list[float] = 0, scale: float = 1.0, scale_both: float = 1.0
    ) -> None:
        if isinstance(start, bool):
            raise ValueError(f"start must be an index 0..{len(START_POINTS) - 1} or a pair (x1, x2), got {start!r}")
        if isinstance(start, int):
            if not 0 <= start < len(START_POINTS):
                raise ValueError(f"start index must be in 0..{len(START_POINTS) - 1}, got {start}")
            point = START_POINTS[start]
        else:
            try:
                point = tuple(float(v) for v in start)  # type: ignore[assignment]  # length checked below
            except (TypeError, ValueError):
                raise ValueError(f"start must be an index or a pair of numbers, got {start!r}") from None
            if len(point) != 2 or not all(torch.isfinite(torch.tensor(point))):
                raise ValueError(f"start must be a finite pair (x1, x2), got {start!r}")
        for nm, v in (("scale", scale), ("scale_both", scale_both)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{nm} must be a number > 0, got {v!r}")
        self.start = start  # the option as given (the registry compares options to defaults)
        self.point = (float(point[0]), float(point[1]))
        self.scale = float(scale)
        self.scale_both = float(scale_both)

    def build_model(self, seed: int) -> nn.Module:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        # Deterministic start: the seed has nothing to initialise.
        return Toy2Model(self.point, self.scale, self.scale_both)

    def train_size(self) -> int:
        return 1

    def batch(self, indices: Tensor) -> None:
        return None

    def losses(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        out = model(batch)
        return {"f1": out[0], "f2": out[1]}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = model(None)
        return {"f1": float(out[0]), "f2": float(out[1])}
