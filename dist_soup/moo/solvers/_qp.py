"""Small exact quadratic programs in Gram space (K variables, numpy float64).

``solve_qp(Q, p, lower, simplex)`` returns ``argmin_x 1/2 x^T Q x + p^T x`` subject to
``x >= lower`` (elementwise) and, when ``simplex``, ``sum(x) = 1``. It is a primal active-set
method: at each iteration the equality-constrained problem on the free variables is solved
exactly from its KKT system; a step that would cross a bound stops at it and fixes that variable;
at the equality-constrained optimum the bound with the most negative multiplier is released.
For a strictly convex problem this terminates in finitely many steps at the exact optimum
(up to rounding), unlike Frank-Wolfe, whose error decays like 1/t.

A PSD but singular Q (K larger than the rank of J, a zero Gram) has a unique optimal *direction*
``J^T x`` but possibly many optimal x; a ridge of ``ridge * mean(diag Q)`` makes the problem
strictly convex and picks one, perturbing the objective by that relative amount only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["solve_qp", "project_simplex"]

RIDGE = 1e-12


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def solve_qp(
    q: np.ndarray,
    p: np.ndarray,
    lower: np.ndarray | None = None,
    *,
    simplex: bool,
    x0: np.ndarray | None = None,
    ridge: float = RIDGE,
    max_iter: int | None = None,
) -> np.ndarray:
    """Exact minimiser of ``1/2 x^T Q x + p^T x`` over ``{x >= lower}`` (and ``sum x = 1``).

    ``lower`` defaults to 0; with ``simplex`` it must be 0. ``x0`` (feasible) warm-starts.
    """
    q = np.asarray(q, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    k = p.shape[0]
    lower = np.zeros(k) if lower is None else np.asarray(lower, dtype=np.float64)
    scale = float(np.mean(np.abs(np.diag(q)))) if k else 0.0
    q = 0.5 * (q + q.T) + (ridge * scale if scale > 0 else ridge) * np.eye(k)
    tol = 1e-13 * max(float(np.max(np.abs(q))), float(np.max(np.abs(p))) if k else 0.0, 1e-300)
    max_iter = max_iter or 50 * (k + 2)

    if simplex:
        if x0 is not None and np.all(x0 >= 0) and abs(float(np.sum(x0)) - 1.0) < 1e-9:
            x = np.clip(x0, 0.0, None)
            x = x / x.sum()
        else:
            # Start at the best vertex.
            j = int(np.argmin(0.5 * np.diag(q) + p))
            x = np.zeros(k)
            x[j] = 1.0
    else:
        x = lower.copy() if x0 is None else np.maximum(np.asarray(x0, dtype=np.float64), lower)
    active = x <= lower  # bounds held in the working set

    for _ in range(max_iter):
        free = ~active
        nf = int(free.sum())
        target = np.where(active, lower, 0.0)
        mu = 0.0
        if nf:
            qff = q[np.ix_(free, free)]
            rhs = -(p[free] + q[np.ix_(free, active)] @ lower[active])
            if simplex:
                kkt = np.zeros((nf + 1, nf + 1))
                kkt[:nf, :nf] = qff
                kkt[:nf, nf] = -1.0
                kkt[nf, :nf] = 1.0
                sol = _solve(kkt, np.concatenate([rhs, [1.0 - lower[active].sum()]]))
                target[free] = sol[:nf]
                mu = float(sol[nf])
            else:
                target[free] = _solve(qff, rhs)
        d = target - x
        blocking = free & (target < lower) & (d < 0)
        if blocking.any():
            ratios = np.full(k, np.inf)
            ratios[blocking] = (lower[blocking] - x[blocking]) / d[blocking]
            i = int(np.argmin(ratios))
            x = x + max(0.0, min(1.0, ratios[i])) * d
            x[i] = lower[i]
            active[i] = True
            continue
        x = target
        if not active.any():
            break
        # KKT multipliers of the held bounds: grad_i - mu >= 0 at the optimum.
        grad = q @ x + p
        if simplex and nf == 0:
            mu = float(np.min(grad))
        mult = np.where(active, grad - mu, np.inf)
        i = int(np.argmin(mult))
        if mult[i] >= -tol:
            break
        active[i] = False
    if simplex:
        x = np.clip(x, 0.0, None)
        total = x.sum()
        x = x / total if total > 0 else np.full(k, 1.0 / k)
    return x


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based, Held et al.)."""
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, v.shape[0] + 1)
    cond = u - css / idx > 0
    r = int(idx[cond][-1])
    theta = css[r - 1] / r
    return np.maximum(v - theta, 0.0)
