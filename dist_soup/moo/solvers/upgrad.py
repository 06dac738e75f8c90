"""UPGrad: average of each gradient projected onto the dual cone of all gradients."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._qp import solve_qp
from .base import Solver, check_nonnegative

__all__ = ["UPGrad"]


class UPGrad(Solver):
    r"""UPGrad (Quinton & Rey, "Jacobian descent for multi-objective optimization", 2024).

    The dual cone of the rows is ``C = {x : J x >= 0}``: an update ``-eta x`` increases no loss
    to first order. Each scaled row
    ``g_i / K`` is projected onto it and the projections are summed. By the paper's Proposition 1
    the projection of ``J^T u`` is ``J^T v`` with ``v = argmin_{v >= u} v^T G v``; with
    ``u = e_i / K`` this is a bound-constrained QP in K variables, solved exactly (active set).
    The weights are ``sum_i v^i``. ``reg_eps`` adds ``reg_eps * mean(diag G)`` to the diagonal
    (torchjd adds 1e-4 times the trace after normalizing; here the default is tiny so the result
    is the exact projection). A zero Gram gives the uniform ``1/K`` weights.
    """

    name = "upgrad"
    needs_gram = True
    needs_psd = True

    def __init__(self, reg_eps: float = 1e-12) -> None:
        self.reg_eps = check_nonnegative("reg_eps", reg_eps, "upgrad")

    def options(self) -> dict[str, Any]:
        return {"reg_eps": self.reg_eps}

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        k = gram.shape[0]
        total = np.zeros(k)
        for i in range(k):
            u = np.zeros(k)
            u[i] = 1.0 / k
            total += solve_qp(gram, np.zeros(k), u, simplex=False, ridge=self.reg_eps)
        return total
