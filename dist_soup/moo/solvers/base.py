"""The solver contract: weights of the K objectives from their Gram matrix and losses.

A solver maps ``(G, L)`` (``G = J J^T``, K x K; ``L`` the K current losses) to weights
``lambda`` (K,), and the update direction is ``J^T lambda``. Everything it remembers between
calls (warm starts, logits, loss history) lives in the object and round-trips through
``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..gram import psd_clip

__all__ = ["Solver", "check_positive", "check_nonnegative"]


def check_positive(name: str, value: Any, solver: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{solver}: option {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative(name: str, value: Any, solver: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{solver}: option {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _psd(gram: np.ndarray) -> np.ndarray:
    """The Gram itself when PSD, else its projection onto the PSD cone (an indefinite estimate,
    e.g. the cross-worker Gram, would make a convex QP non-convex)."""
    if np.linalg.eigvalsh(gram)[0] >= 0.0:
        return gram
    return psd_clip(torch.from_numpy(gram)).numpy()


class Solver(ABC):
    """Base class. Subclasses implement :meth:`_solve` on float64 numpy arrays.

    ``needs_gram``: whether the Gram is used at all (loss-based solvers accept ``gram=None``).
    ``needs_psd``: whether the Gram must be PSD; :meth:`weights` then clips a Gram with a
    negative eigenvalue onto the PSD cone (eigenvalues at 0) before solving.
    """

    name: ClassVar[str]
    needs_gram: ClassVar[bool] = True
    needs_psd: ClassVar[bool] = True

    def weights(self, gram: Tensor | None, losses: Tensor) -> Tensor:
        """K float32 weights ``lambda`` (on the device of ``losses``); the direction is ``J^T lambda``.

        Raises ValueError for a non-finite Gram or non-finite losses, or mismatched shapes.
        """
        if not isinstance(losses, Tensor):
            losses = torch.as_tensor(losses)
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(f"{self.name}: losses must have shape (K,), got {tuple(losses.shape)}")
        k = losses.numel()
        l_np = losses.detach().to(torch.float64).cpu().numpy()
        if not np.all(np.isfinite(l_np)):
            raise ValueError(f"{self.name}: losses are not finite: {l_np.tolist()}")
        g_np = None
        if gram is not None or self.needs_gram:
            if gram is None:
                raise ValueError(f"{self.name}: this solver needs the Gram matrix (got None)")
            if not isinstance(gram, Tensor):
                gram = torch.as_tensor(gram)
            if gram.shape != (k, k):
                raise ValueError(
                    f"{self.name}: gram must have shape (K, K) = ({k}, {k}) to match the losses, "
                    f"got {tuple(gram.shape)}"
                )
            g_np = gram.detach().to(torch.float64).cpu().numpy()
            if self.needs_gram and not np.all(np.isfinite(g_np)):
                raise ValueError(f"{self.name}: gram has non-finite (NaN or Inf) entries")
            g_np = 0.5 * (g_np + g_np.T)
            if self.needs_psd and g_np.shape[0] > 1:
                g_np = _psd(g_np)
        w = np.asarray(self._solve(g_np, l_np), dtype=np.float64)
        if w.shape != (k,) or not np.all(np.isfinite(w)):
            # A solver bug must never leak NaN weights into a training step.
            raise FloatingPointError(f"{self.name}: solver produced invalid weights {w.tolist()}")
        return torch.from_numpy(w).to(device=losses.device, dtype=torch.float32)

    @abstractmethod
    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        """Weights (K,) from a symmetric finite Gram (None for loss-based solvers) and losses."""

    def state_dict(self) -> dict[str, Any]:
        """What the solver remembers between calls (tensors and plain numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a stateless solver accepts only an empty dict."""
        if state:
            raise ValueError(f"{self.name}: stateless solver got a non-empty state {sorted(state)}")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def options(self) -> dict[str, Any]:
        """The construction options (for logs and checkpoints)."""
        return {}
