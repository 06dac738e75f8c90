"""MGDA: the exact minimum-norm point of the convex hull of the objective gradients."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._qp import solve_qp
from .base import Solver

__all__ = ["MGDA", "NORMALIZATIONS", "min_norm_weights"]

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    r"""``argmin_{lambda in simplex} lambda^T G lambda`` (exact).

    K = 1: ``[1]``. K = 2: closed form; with ``g_1, g_2`` the rows,
    ``lambda_1 = clip((g_2 - g_1) . g_2 / ||g_1 - g_2||^2, 0, 1)
              = clip((G_22 - G_12) / (G_11 + G_22 - 2 G_12), 0, 1)``, ``lambda_2 = 1 - lambda_1``
    (1/2 each when ``g_1 = g_2``). K > 2: the exact active-set QP of :mod:`._qp`.
    """
    k = gram.shape[0]
    if k == 1:
        return np.ones(1)
    if k == 2:
        denom = gram[0, 0] + gram[1, 1] - 2.0 * gram[0, 1]
        scale = max(abs(gram[0, 0]), abs(gram[1, 1]), 1e-300)
        if denom <= 1e-14 * scale:
            return np.array([0.5, 0.5])
        a = float(np.clip((gram[1, 1] - gram[0, 1]) / denom, 0.0, 1.0))
        return np.array([a, 1.0 - a])
    return solve_qp(gram, np.zeros(k), simplex=True)


class MGDA(Solver):
    r"""Multiple-gradient descent (Désidéri 2012; Sener & Koltun 2018).

    ``lambda* = argmin_{lambda in Delta_K} || sum_k lambda_k g_k / n_k ||^2``, i.e. the QP
    ``min lambda^T Gn lambda`` over the simplex with the normalized Gram
    ``Gn_ij = G_ij / (n_i n_j)``, solved exactly (closed form for K=2, active-set QP beyond;
    not Frank-Wolfe). As in LibMTL the update is ``sum_k lambda*_k g_k / n_k``, so the returned
    weights on the raw gradients are ``lambda*_k / n_k``. Normalizers ``n_k`` (``normalization``):
    ``none`` 1; ``l2`` ``||g_k|| = sqrt(G_kk)``; ``loss`` ``L_k``; ``loss+`` ``L_k ||g_k||``.
    A zero-norm row is left unnormalized (its norm counts as 1); ``loss``/``loss+`` need
    positive losses. With ``none`` the weights sum to 1. A zero Gram gives uniform weights.
    If the origin is in the hull (Pareto-stationary point) the direction is 0.
    """

    name = "mgda"
    needs_gram = True
    needs_psd = True

    def __init__(self, normalization: str = "none") -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"mgda: unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}"
            )
        self.normalization = normalization

    def options(self) -> dict[str, Any]:
        return {"normalization": self.normalization}

    def _normalizers(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        k = gram.shape[0]
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        norms = np.where(norms > 0, norms, 1.0)
        if self.normalization == "none":
            return np.ones(k)
        if self.normalization == "l2":
            return norms
        if np.any(losses <= 0):
            raise ValueError(
                f"mgda: normalization {self.normalization!r} needs positive losses, got {losses.tolist()}"
            )
        return losses.copy() if self.normalization == "loss" else losses * norms

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        n = self._normalizers(gram, losses)
        gn = gram / np.outer(n, n)
        return min_norm_weights(gn) / n
