"""Nash-MTL: the Nash bargaining solution among the objective gradients."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Solver, check_nonnegative

__all__ = ["NashMTL"]


class NashMTL(Solver):
    r"""Nash-MTL (Navon et al. 2022): weights ``alpha > 0`` with ``G alpha = 1 / alpha``.

    As in the official code the Gram is first scaled to unit Frobenius norm, ``Gn = G/||G||_F``.
    The bargaining condition ``Gn alpha = 1/alpha`` is the stationarity condition of the
    strictly convex ``f(alpha) = 1/2 alpha^T Gn alpha - sum_k log alpha_k`` (alpha > 0), which is
    minimised here by damped Newton with backtracking (Hessian ``Gn + diag(1/alpha^2)``), to
    machine precision, instead of the official sequence of cvxpy sub-problems. A ridge
    ``reg_eps * I`` keeps f bounded below when Gn is singular with a non-negative null vector
    (e.g. one zero gradient): the weights then stay finite, of order ``1/sqrt(reg_eps)`` on that
    objective. A zero Gram gives ones. The direction ``J^T alpha`` has equal projections
    ``alpha_k (g_k . d) = ||G||_F`` on every objective.
    """

    name = "nash"
    needs_gram = True
    needs_psd = True

    def __init__(self, reg_eps: float = 1e-6, max_iter: int = 100) -> None:
        self.reg_eps = check_nonnegative("reg_eps", reg_eps, "nash")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"nash: max_iter must be an int >= 1, got {max_iter!r}")
        self.max_iter = max_iter

    def options(self) -> dict[str, Any]:
        return {"reg_eps": self.reg_eps, "max_iter": self.max_iter}

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        k = gram.shape[0]
        fro = float(np.linalg.norm(gram))
        if fro <= 0.0:
            return np.ones(k)
        g = gram / fro + self.reg_eps * np.eye(k)

        def f(a: np.ndarray) -> float:
            return 0.5 * float(a @ g @ a) - float(np.sum(np.log(a)))

        diag = np.clip(np.diag(g), 1e-12, None)
        a = 1.0 / np.sqrt(diag)
        fa = f(a)
        for _ in range(self.max_iter):
            grad = g @ a - 1.0 / a
            hess = g + np.diag(1.0 / (a * a))
            step = np.linalg.solve(hess, grad)
            decrement = float(grad @ step)
            if decrement <= 1e-24 * max(1.0, abs(fa)):
                break
            t = 1.0
            while True:
                cand = a - t * step
                if np.all(cand > 0):
                    fc = f(cand)
                    if fc <= fa - 0.25 * t * decrement:
                        break
                t *= 0.5
                if t < 1e-20:
                    cand, fc = a, fa
                    break
            if cand is a:
                break
            a, fa = cand, fc
        return a
