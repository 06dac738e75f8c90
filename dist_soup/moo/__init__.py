"""Multi-objective math, free of processes: Jacobians on selected tensors, Gram estimates,
layer selection, solvers and recipes. Nothing here touches torch.distributed.

Submodules: ``jacobian`` (``jacobian.jacobian``), ``gram``, ``selection``, ``solvers``,
``recipe``. The function ``jacobian`` is not re-exported here, so that
``dist_soup.moo.jacobian`` stays the module.
"""

from . import gram, jacobian, recipe, selection, solvers
from .gram import check_finite, cross_gram, local_grams, psd_clip
from .recipe import Level, Recipe, Schedule, build_recipe
from .selection import Selection, conflict_scores, select

__all__ = [
    "gram",
    "jacobian",
    "recipe",
    "selection",
    "solvers",
    "local_grams",
    "cross_gram",
    "psd_clip",
    "check_finite",
    "conflict_scores",
    "select",
    "Selection",
    "Schedule",
    "Level",
    "Recipe",
    "build_recipe",
]
