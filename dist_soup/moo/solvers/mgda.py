"""MGDA: the exact minimum-norm point of the convex hull of the (normalized) objective gradients."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

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
    r"""Multiple-gradient descent (Désidéri 2012; Sener & Koltun 2018), with the two remedies
    the literature uses against its weights flipping between vertices of the simplex.

    **Solve.** With normalizers ``n_k > 0`` (``normalization``, below), the rows are scaled to
    ``u_k = g_k / n_k``, whose Gram is ``Gn = D^-1 G D^-1``, i.e. ``Gn_ij = G_ij / (n_i n_j)``
    (``D = diag(n)``), computed from ``G`` without the gradients. The min-norm point of their hull

        ``mu* = argmin_{mu in Delta_K} mu^T Gn mu = argmin_{mu in Delta_K} || sum_k mu_k u_k ||^2``

    is solved exactly (closed form for K = 2,
    ``mu_1 = clip((Gn_22 - Gn_12) / (Gn_11 + Gn_22 - 2 Gn_12), 0, 1)``; active-set QP beyond;
    not Frank-Wolfe).

    **Map back.** The update is the normalized combination ``d = sum_k mu_k u_k`` (as in
    LibMTL's MGDA), and a solver returns weights on the raw gradients (``d = J^T lambda``), so
    ``lambda_k = mu_k / n_k``: then ``J^T lambda = sum_k mu_k g_k / n_k = d``. With
    ``none`` the weights sum to 1; otherwise they do not, and their scale (hence the step's)
    follows the normalizers: ``l2`` gives ``||d|| <= 1``, and a level's weights change scale
    against an unnormalized level (e.g. the ``ew`` penalty level of ``vc``).

    **Normalizers** (Sener & Koltun's MGDA-UB code): ``none`` ``n_k = 1``; ``l2``
    ``n_k = ||g_k|| = sqrt(G_kk)``; ``loss`` ``n_k = L_k``; ``loss+`` ``n_k = L_k ||g_k||``.
    A zero-norm row is left unnormalized (its norm counts as 1); ``loss`` and ``loss+`` need
    positive losses. Normalizing removes the pull of the largest gradient, which with
    ``none`` puts the min-norm point on the vertex of the smallest gradient whenever the
    gradients differ much in size, and so flips with noise in their norms.

    **Momentum** on the simplex weights across solves: with ``momentum = beta`` in [0, 1),

        ``mu_t = beta * mu_{t-1} + (1 - beta) * mu*_t``   (``mu_1 = mu*_1``, the first solve),

    and the returned weights are ``mu_t / n_t`` with the current normalizers. The average is
    taken on ``mu`` (a point of the simplex, comparable from one solve to the next, and a
    convex combination of simplex points stays in it), not on ``mu / n``, whose scale moves
    with the gradient norms and losses. ``beta = 0`` (default) is plain MGDA and keeps no
    state. The averaged ``mu`` is the solver's state (``state_dict``), so a resumed run
    continues the same sequence. With ``solve_every > 1`` the average runs over solves, not
    steps: the weights of a solve are reused until the next one.

    Other solvers that do not flip: ``modo`` moves lambda by one projected-gradient step per
    solve (warm-started, so it changes by at most ``gamma ||G lambda + rho lambda||``), and
    ``upgrad``'s weights (projections of every row onto the dual cone, summed) are continuous
    in the Gram, with no vertex to jump to. A zero Gram gives uniform weights; if the origin is
    in the hull (a Pareto-stationary point) the direction is 0.
    """

    name = "mgda"
    needs_gram = True
    needs_psd = True

    def __init__(self, normalization: str = "none", momentum: float = 0.0) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"mgda: unknown normalization {normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not np.isfinite(momentum)
            or not 0.0 <= momentum < 1.0
        ):
            # 1 would freeze the weights at the first solve for the whole run.
            raise ValueError(f"mgda: option momentum must be a number in [0, 1), got {momentum!r}")
        self.normalization = normalization
        self.momentum = float(momentum)
        self._mu: np.ndarray | None = None  # the averaged simplex weights (momentum > 0)

    def options(self) -> dict[str, Any]:
        return {"normalization": self.normalization, "momentum": self.momentum}

    def _normalizers(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        k = gram.shape[0]
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        norms = np.where(norms > 0, norms, 1.0)
        if self.normalization == "none":
            return np.ones(k)
        if self.normalization == "l2":
            return norms
        if np.any(losses <= 0):
            raise ValueError(f"mgda: normalization {self.normalization!r} needs positive losses, got {losses.tolist()}")
        return losses.copy() if self.normalization == "loss" else losses * norms

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        n = self._normalizers(gram, losses)
        mu = min_norm_weights(gram / np.outer(n, n))
        if self.momentum > 0.0:
            if self._mu is not None:
                if self._mu.shape != mu.shape:
                    raise ValueError(
                        f"mgda: the momentum state holds {self._mu.shape[0]} weights but this Gram has "
                        f"{mu.shape[0]} objectives (a state of another recipe?)"
                    )
                mu = self.momentum * self._mu + (1.0 - self.momentum) * mu
            self._mu = mu.copy()
        return mu / n

    def state_dict(self) -> dict[str, Any]:
        if self.momentum == 0.0:
            return {}
        return {"mu": None if self._mu is None else torch.from_numpy(self._mu.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.momentum == 0.0:
            if state:
                raise ValueError(f"mgda: without momentum the solver keeps no state, got keys {sorted(state)}")
            return
        if set(state) != {"mu"}:
            raise ValueError(f"mgda: with momentum the state must have the key 'mu' only, got {sorted(state)}")
        mu = state["mu"]
        if mu is None:
            self._mu = None
            return
        mu = torch.as_tensor(mu, dtype=torch.float64).numpy().copy()
        if mu.ndim != 1 or not np.all(np.isfinite(mu)) or np.any(mu < 0) or abs(float(mu.sum()) - 1.0) > 1e-6:
            raise ValueError(f"mgda: state 'mu' must be a point of the simplex, got {mu.tolist()}")
        self._mu = mu
