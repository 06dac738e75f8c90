"""PCGrad: gradient surgery, expressed as weights from the Gram."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Solver

__all__ = ["PCGrad"]


class PCGrad(Solver):
    r"""PCGrad (Yu et al. 2020), Algorithm 1, in Gram space.

    For each objective i, ``g_i^PC = g_i``; for every other j in a random order, if
    ``g_i^PC . g_j < 0`` then ``g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j``. The update is
    ``sum_i g_i^PC``. Each ``g_i^PC = J^T c^i`` stays in the row space, so only coefficients are
    tracked: ``g_i^PC . g_j = (G c^i)_j`` and the subtraction is ``c^i_j -= (G c^i)_j / G_jj``;
    the weights are ``sum_i c^i``. A zero row (``G_jj = 0``) never conflicts.

    The orders come from a ``torch.Generator`` seeded with ``seed`` (one ``randperm(K)`` per
    objective, in objective order), kept in the state so runs and resumes are reproducible.
    """

    name = "pcgrad"
    needs_gram = True
    needs_psd = True

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"pcgrad: seed must be an int, got {seed!r}")
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        k = gram.shape[0]
        total = np.zeros(k)
        for i in range(k):
            order = torch.randperm(k, generator=self._gen).tolist()
            coef = np.zeros(k)
            coef[i] = 1.0
            for j in order:
                if j == i or gram[j, j] <= 0.0:
                    continue
                dot = float(gram[j] @ coef)
                if dot < 0.0:
                    coef[j] -= dot / gram[j, j]
            total += coef
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"generator"}:
            raise ValueError(f"pcgrad: state must have key 'generator', got {sorted(state)}")
        self._gen.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
