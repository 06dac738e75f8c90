"""MoDo: one projected-gradient step on the MGDA objective per call, warm-started."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._qp import project_simplex
from .base import Solver, check_nonnegative, check_positive

__all__ = ["MoDo"]


class MoDo(Solver):
    r"""MoDo (Chen, Fernando et al., "Three-way trade-off in multi-objective learning", 2023).

    Each call takes one step of projected gradient descent on
    ``1/2 lambda^T G lambda + rho/2 ||lambda||^2`` over the simplex:
    ``lambda <- Proj_Delta(lambda - gamma (G lambda + rho lambda))`` and returns the new
    ``lambda`` (state: ``lambda``, starting uniform; reset when K changes). MoDo's
    convergence argument needs an unbiased Gram such as ``J_1 J_2^T`` from independent batches:
    the cross-worker estimate provides it, and it need not be PSD (``needs_psd = False``).
    Defaults ``gamma = 1e-3``, ``rho = 0.1`` as in LibMTL. A zero Gram shrinks towards uniform.
    """

    name = "modo"
    needs_gram = True
    needs_psd = False

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1) -> None:
        self.gamma = check_positive("gamma", gamma, "modo")
        self.rho = check_nonnegative("rho", rho, "modo")
        self._lambda: np.ndarray | None = None

    def options(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "rho": self.rho}

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        k = gram.shape[0]
        lam = self._lambda
        if lam is None or lam.shape[0] != k:
            lam = np.full(k, 1.0 / k)
        lam = project_simplex(lam - self.gamma * (gram @ lam + self.rho * lam))
        self._lambda = lam
        return lam.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": None if self._lambda is None else torch.from_numpy(self._lambda.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"lambda"}:
            raise ValueError(f"modo: state must have key 'lambda', got {sorted(state)}")
        lam = state["lambda"]
        self._lambda = None if lam is None else torch.as_tensor(lam, dtype=torch.float64).numpy().copy()
