"""Loss-based weightings that need no Jacobian: FAMO and DWA."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Solver, check_nonnegative, check_positive

__all__ = ["FAMO", "DWA"]


def _arr(value: Any) -> np.ndarray | None:
    return None if value is None else torch.as_tensor(value, dtype=torch.float64).numpy().copy()


def _ten(value: np.ndarray | None) -> torch.Tensor | None:
    return None if value is None else torch.from_numpy(value.copy())


class FAMO(Solver):
    r"""FAMO (Liu et al. 2023, "Fast adaptive multitask optimization").

    Logits ``xi`` (K), ``z = softmax(xi)``. With ``D_k = L_k - m_k + eps`` (``m`` the
    ``min_losses``), the update direction is the gradient of ``sum_k (z_k / c) log D_k``,
    ``c = sum_k z_k / D_k``, i.e. weights ``lambda_k = z_k / (c D_k)`` (they sum to 1): the
    step that decreases every ``log L_k`` at the rate set by ``z``.

    The logits learn from the loss decrease between consecutive calls: with the previous call's
    losses ``L^-``, ``delta_k = log D_k(L^-) - log D_k(L)`` and ``xi`` takes one Adam step
    (``lr = w_lr``, weight decay ``gamma``, betas (0.9, 0.999)) along
    ``d xi = (diag z - z z^T) delta`` (the softmax Jacobian applied to ``delta``), before the
    weights of this call are formed. The official code compares losses on one batch before and
    after the step; here they come from consecutive calls (consecutive batches).
    Defaults as the official code: ``gamma = 0.01``, ``w_lr = 0.025``. Losses must exceed
    ``min_losses``. State: logits, Adam moments and step, previous losses.
    """

    name = "famo"
    needs_gram = False
    needs_psd = False

    def __init__(
        self,
        gamma: float = 0.01,
        w_lr: float = 0.025,
        min_losses: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        self.gamma = check_nonnegative("gamma", gamma, "famo")
        self.w_lr = check_positive("w_lr", w_lr, "famo")
        self.eps = check_nonnegative("eps", eps, "famo")
        mins = np.atleast_1d(np.asarray(min_losses, dtype=np.float64))
        if mins.ndim != 1 or not np.all(np.isfinite(mins)):
            raise ValueError(f"famo: min_losses must be a finite number or sequence, got {min_losses!r}")
        self.min_losses = mins
        self._logits: np.ndarray | None = None
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None
        self._step = 0
        self._prev: np.ndarray | None = None

    def options(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "w_lr": self.w_lr, "min_losses": self.min_losses.tolist(), "eps": self.eps}

    def _shifted(self, losses: np.ndarray) -> np.ndarray:
        k = losses.shape[0]
        mins = self.min_losses
        if mins.shape[0] not in (1, k):
            raise ValueError(f"famo: min_losses has {mins.shape[0]} entries for K={k} objectives")
        d = losses - mins + self.eps
        if np.any(d <= 0):
            raise ValueError(f"famo: losses {losses.tolist()} must exceed min_losses {mins.tolist()}")
        return d

    def _reset(self, k: int) -> None:
        self._logits = np.zeros(k)
        self._m = np.zeros(k)
        self._v = np.zeros(k)
        self._step = 0
        self._prev = None

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        k = losses.shape[0]
        d_now = self._shifted(losses)
        if self._logits is None or self._logits.shape[0] != k:
            self._reset(k)
        assert self._logits is not None and self._m is not None and self._v is not None
        if self._prev is not None:
            delta = np.log(self._shifted(self._prev)) - np.log(d_now)
            z = _softmax(self._logits)
            grad = z * (delta - float(z @ delta)) + self.gamma * self._logits
            self._step += 1
            self._m = 0.9 * self._m + 0.1 * grad
            self._v = 0.999 * self._v + 0.001 * grad * grad
            m_hat = self._m / (1.0 - 0.9**self._step)
            v_hat = self._v / (1.0 - 0.999**self._step)
            self._logits = self._logits - self.w_lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        z = _softmax(self._logits)
        c = float(np.sum(z / d_now))
        self._prev = losses.copy()
        return z / (c * d_now)

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": _ten(self._logits),
            "exp_avg": _ten(self._m),
            "exp_avg_sq": _ten(self._v),
            "step": self._step,
            "prev_losses": _ten(self._prev),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"logits", "exp_avg", "exp_avg_sq", "step", "prev_losses"}
        if set(state) != keys:
            raise ValueError(f"famo: state must have keys {sorted(keys)}, got {sorted(state)}")
        self._logits = _arr(state["logits"])
        self._m = _arr(state["exp_avg"])
        self._v = _arr(state["exp_avg_sq"])
        self._step = int(state["step"])
        self._prev = _arr(state["prev_losses"])

    def logits(self) -> np.ndarray | None:
        """The current task logits ``xi`` (None before the first call)."""
        return None if self._logits is None else self._logits.copy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


class DWA(Solver):
    r"""Dynamic Weight Average (Liu, Johns & Davison 2019).

    ``lambda_k(t) = K exp(r_k / T) / sum_i exp(r_i / T)`` with ``r_k = L_k(t-1) / L_k(t-2)``,
    the ratio of the losses seen at the two previous calls (the paper uses epoch averages: call
    the solver once per epoch with epoch-mean losses for that reading). The first two calls
    return ones. ``T = 2`` by default. The weights sum to K. Losses must be positive.
    State: the two previous loss vectors.
    """

    name = "dwa"
    needs_gram = False
    needs_psd = False

    def __init__(self, T: float = 2.0) -> None:
        self.T = check_positive("T", T, "dwa")
        self._hist: list[np.ndarray] = []

    def options(self) -> dict[str, Any]:
        return {"T": self.T}

    def _solve(self, gram: np.ndarray | None, losses: np.ndarray) -> np.ndarray:
        k = losses.shape[0]
        if np.any(losses <= 0):
            raise ValueError(f"dwa: losses must be positive, got {losses.tolist()}")
        if self._hist and self._hist[-1].shape[0] != k:
            self._hist = []
        if len(self._hist) < 2:
            w = np.ones(k)
        else:
            r = self._hist[-1] / self._hist[-2]
            w = k * _softmax(r / self.T)
        self._hist = (self._hist + [losses.copy()])[-2:]
        return w

    def state_dict(self) -> dict[str, Any]:
        return {"history": [torch.from_numpy(h.copy()) for h in self._hist]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"history"}:
            raise ValueError(f"dwa: state must have key 'history', got {sorted(state)}")
        hist = [_arr(h) for h in state["history"]]
        if len(hist) > 2:
            raise ValueError(f"dwa: history holds at most 2 loss vectors, got {len(hist)}")
        self._hist = [h for h in hist if h is not None]
