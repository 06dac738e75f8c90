"""CAGrad: the conflict-averse direction, as weights on the objective gradients."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._qp import solve_qp
from .base import Solver, check_nonnegative

__all__ = ["CAGrad"]


class CAGrad(Solver):
    r"""CAGrad (Liu et al. 2021), Algorithm 1, in Gram space.

    With ``g_0 = (1/K) sum_k g_k`` (``b = 1/K``) and ``phi = c^2 ||g_0||^2``, the dual problem
    ``min_{w in Delta_K} g_w . g_0 + sqrt(phi) ||g_w||`` (``g_w = J^T w``) reads
    ``min_w w^T G b + c sqrt(b^T G b) sqrt(w^T G w)``. The update is
    ``d = g_0 + (sqrt(phi) / ||g_w||) g_w``, so the weights are
    ``lambda = b + (c ||g_0|| / ||g_w||) w``, divided by ``1 + c^2`` (``rescale=1``, the official
    default), ``1 + c`` (``rescale=2``) or 1 (``rescale=0``, as torchjd).

    The non-smooth dual is solved exactly: ``sqrt(q) = min_{u>0} q/(2u) + u/2`` turns it into
    ``min_u min_w [w^T G b + s (w^T G w/(2u) + u/2)]`` (jointly convex); for fixed u the inner
    problem is a simplex QP solved exactly, and the optimal u is the root of
    ``u - ||g_{w(u)}||`` (monotone), found by bisection to machine precision.
    When ``g_0 = 0`` or ``c = 0`` the result is the mean; when the optimal ``g_w`` vanishes
    (the origin is in the hull) the official code's ``lambda = b`` is used.
    """

    name = "cagrad"
    needs_gram = True
    needs_psd = True

    def __init__(self, c: float = 0.5, rescale: int = 1) -> None:
        self.c = check_nonnegative("c", c, "cagrad")
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def options(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale}

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        assert gram is not None
        k = gram.shape[0]
        b = np.full(k, 1.0 / k)
        g0_sq = float(b @ gram @ b)
        if self.rescale == 1:
            div = 1.0 + self.c**2
        elif self.rescale == 2:
            div = 1.0 + self.c
        else:
            div = 1.0
        scale = max(float(np.max(np.abs(np.diag(gram)))), 1e-300)
        if self.c == 0.0 or g0_sq <= 1e-14 * scale:
            return b / div
        s = self.c * np.sqrt(g0_sq)
        a = gram @ b

        def norm_w(w: np.ndarray) -> float:
            return float(np.sqrt(max(float(w @ gram @ w), 0.0)))

        def inner(u: float, x0: np.ndarray | None) -> np.ndarray:
            return solve_qp((s / u) * gram, a, simplex=True, x0=x0)

        hi = float(np.sqrt(max(np.max(np.diag(gram)), 0.0)))
        lo = 0.0
        w = inner(hi, None)
        # The minimiser u* satisfies u* = ||g_{w(u*)}|| <= max_k ||g_k|| = hi.
        if norm_w(w) >= hi:
            u = hi
        else:
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if hi - lo <= 1e-13 * hi:
                    break
                w = inner(mid, w)
                if mid - norm_w(w) >= 0.0:
                    hi = mid
                else:
                    lo = mid
            u = hi
            w = inner(u, w)
        gw = norm_w(w)
        if gw <= 1e-9 * np.sqrt(scale):
            return b / div
        return (b + (s / gw) * w) / div
