"""Gram matrices of per-objective gradients, per tensor, and their cross-worker estimates.

For one tensor l with Jacobian rows ``J_l`` (K x n_l) the Gram block is ``G_l = J_l J_l^T``
(K x K); the Gram of a set of tensors is the sum of the blocks, ``G = sum_l G_l``.

With P workers, each holding its own (compressed, decoded) rows ``Jhat^p``, two estimates of the
true Gram ``E[J] E[J]^T``:

* ``plain``: ``Jbar Jbar^T`` with ``Jbar = (1/P) sum_p Jhat^p``. Its diagonal carries the
  variance of ``Jbar`` (minibatch and compression noise, about variance / P).
* ``cross``: with ``T = sum_p Jhat^p = P Jbar``,
  ``G_cross = (T T^T - sum_p Jhat^p Jhat^p^T) / (P (P - 1))
           = (1 / (P (P-1))) sum_{p != q} Jhat^p Jhat^q^T``,
  an average of products of rows from different workers. Their noises are independent, so
  ``E[G_cross] = E[J] E[J]^T`` exactly (the double-sampling idea of MoDo). It can be indefinite:
  :func:`psd_clip` projects it onto the PSD cone for solvers that need it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["local_grams", "cross_gram", "psd_clip", "check_finite"]


def _check_square(g: Tensor, what: str) -> None:
    if not isinstance(g, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(g).__name__}")
    if g.dim() < 2 or g.shape[-1] != g.shape[-2]:
        raise ValueError(f"{what} must have shape (..., K, K); got {tuple(g.shape)}")


def local_grams(rows: Sequence[Tensor], *, dtype: torch.dtype | None = None) -> Tensor:
    """The Gram block of every tensor: ``out[l] = R_l R_l^T`` with ``R_l = rows[l].reshape(K, -1)``.

    Returns a float64 tensor of shape ``(L, K, K)`` on the rows' device. The products run in
    ``dtype`` (default: the rows' dtype, half types promoted to float32); pass ``torch.float64``
    when the rows are large and the Grams feed a cancelling difference such as :func:`cross_gram`
    at high precision.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("local_grams needs at least one tensor of rows")
    for l, r in enumerate(rows):
        if not isinstance(r, Tensor):
            raise TypeError(f"rows[{l}] must be a torch.Tensor, got {type(r).__name__}")
    k = rows[0].shape[0] if rows[0].dim() > 0 else 0
    out = []
    for l, r in enumerate(rows):
        if r.dim() == 0 or r.shape[0] != k or k == 0:
            raise ValueError(f"rows[{l}] has shape {tuple(r.shape)}; every entry must be (K, ...) with the same K >= 1")
        work = dtype or torch.promote_types(r.dtype, torch.float32)
        flat = r.reshape(k, -1).to(work)
        out.append((flat @ flat.T).to(torch.float64))
    return torch.stack(out)


def cross_gram(mean_grams: Tensor, sum_local_grams: Tensor, world_size: int) -> Tensor:
    """The unbiased cross-worker estimate ``(T T^T - sum_p G^p) / (P (P - 1))``.

    ``mean_grams`` is ``Jbar Jbar^T`` (per tensor, ``(..., K, K)``), so ``T T^T = P^2 Jbar Jbar^T``;
    ``sum_local_grams`` is ``sum_p Jhat^p Jhat^p^T`` of the same shape. With one worker there is no
    pair of independent workers: the function returns ``mean_grams`` (the plain estimate).
    """
    _check_square(mean_grams, "mean_grams")
    _check_square(sum_local_grams, "sum_local_grams")
    if mean_grams.shape != sum_local_grams.shape:
        raise ValueError(
            f"mean_grams {tuple(mean_grams.shape)} and sum_local_grams "
            f"{tuple(sum_local_grams.shape)} must have the same shape"
        )
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size == 1:
        return mean_grams
    p = float(world_size)
    mean = mean_grams.to(torch.float64)
    local = sum_local_grams.to(torch.float64)
    return (p * p * mean - local) / (p * (p - 1.0))


def psd_clip(gram: Tensor) -> Tensor:
    """The nearest PSD matrix in Frobenius norm: symmetrize, clip eigenvalues at 0.

    Works on ``(K, K)`` and batched ``(..., K, K)``; computed in float64, returned in the input
    dtype.
    """
    _check_square(gram, "gram")
    check_finite(gram, "gram")
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(g)
    clipped = (evecs * evals.clamp(min=0.0).unsqueeze(-2)) @ evecs.transpose(-1, -2)
    # Re-symmetrize: the product is symmetric only up to rounding.
    clipped = 0.5 * (clipped + clipped.transpose(-1, -2))
    return clipped.to(gram.dtype)


def check_finite(gram: Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` when ``gram`` holds NaN or Inf."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(gram).__name__}")
    if not bool(torch.isfinite(gram).all()):
        bad = int((~torch.isfinite(gram)).sum())
        raise ValueError(f"{what} has {bad} non-finite (NaN or Inf) entries; shape {tuple(gram.shape)}")
