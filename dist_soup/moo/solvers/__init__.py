"""Solvers: weights of K objectives from their Gram matrix (and losses).

``build(name, **options)`` makes one solver; ``solver.weights(gram, losses)`` returns K
float32 weights ``lambda`` and the update direction is ``J^T lambda``.

========  =========================================================  =====  =====
name      what                                                        gram   psd
========  =========================================================  =====  =====
ew        plain sum (unitary scalarization)                           no     no
mgda      exact min-norm point of the hull (normalization, momentum)  yes    yes
modo      one projected step on the MGDA objective per call           yes    no
cagrad    conflict-averse direction (c, rescale)                      yes    yes
pcgrad    gradient surgery, seeded orders                             yes    yes
upgrad    rows projected onto the dual cone, summed                   yes    yes
nash      Nash bargaining (G alpha = 1/alpha)                         yes    yes
famo      fast adaptive weighting from loss decreases                 no     no
dwa       dynamic weight average (T)                                  no     no
========  =========================================================  =====  =====
"""

from __future__ import annotations

from ..._registry import Registry
from .base import Solver
from .cagrad import CAGrad
from .loss_based import DWA, FAMO
from .mgda import MGDA
from .modo import MoDo
from .nash import NashMTL
from .pcgrad import PCGrad
from .scalar import EW
from .upgrad import UPGrad

__all__ = [
    "Solver",
    "build",
    "names",
    "option_names",
    "EW",
    "MGDA",
    "MoDo",
    "CAGrad",
    "PCGrad",
    "UPGrad",
    "NashMTL",
    "FAMO",
    "DWA",
]

SOLVERS: Registry[Solver] = Registry(
    "solver", Solver, {cls.name: cls for cls in (EW, MGDA, MoDo, CAGrad, PCGrad, UPGrad, NashMTL, FAMO, DWA)}
)
names = SOLVERS.names
#: The class registered under a name (ValueError listing the names otherwise).
solver_class = SOLVERS.get
#: A new solver by name with options; unknown names and options raise ValueError.
build = SOLVERS.build


def option_names(name: str) -> tuple[str, ...]:
    """The options solver ``name`` accepts (its constructor's keyword arguments)."""
    return tuple(SOLVERS.options(name))
