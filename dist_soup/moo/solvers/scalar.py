"""Unitary scalarization: the plain sum of the losses."""

from __future__ import annotations

import numpy as np

from .base import Solver

__all__ = ["EW"]


class EW(Solver):
    r"""Equal weights, ``lambda = (1, ..., 1)``: the direction is ``sum_k g_k``, the gradient of
    ``sum_k L_k`` (unitary scalarization; Kurin et al. 2022 found it a strong baseline when
    combined with ordinary regularisation). Ignores the Gram; no state.
    """

    name = "ew"
    needs_gram = False
    needs_psd = False

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        return np.ones(losses.shape[0])
