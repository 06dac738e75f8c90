"""Layer selection (Objective Soups): where do the objectives conflict?

For tensor l with Gram block ``G_l`` the pairwise cosine is
``cos_l(i, j) = G_l[i, j] / sqrt(G_l[i, i] G_l[j, j])`` and the conflict score is its mean over
pairs, ``c_l = (2 / (K (K-1))) sum_{i<j} cos_l(i, j)``: near -1 the objectives pull the tensor
in opposite directions, near +1 they agree. The multi-objective solve runs on the tensors with
the lowest scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["conflict_scores", "select", "Selection", "RULES"]

RULES = ("threshold", "top_m", "budget", "all")


def conflict_scores(grams: Tensor) -> Tensor:
    """Mean pairwise cosine per tensor, shape ``(L,)`` (float64), from Grams ``(L, K, K)``.

    A pair involving a zero-norm row (an objective that does not reach the tensor, or a
    vanishing gradient) counts as cosine 0: orthogonal, neither agreement nor conflict. A
    negative diagonal (possible for the indefinite cross-worker estimate) is treated as 0 too,
    and cosines are clipped to [-1, 1].
    """
    if not isinstance(grams, Tensor):
        raise TypeError(f"grams must be a torch.Tensor, got {type(grams).__name__}")
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must have shape (L, K, K); got {tuple(grams.shape)}")
    k = grams.shape[1]
    if k < 2:
        raise ValueError(f"conflict scores need K >= 2 objectives, got K={k}")
    if not bool(torch.isfinite(grams).all()):
        raise ValueError("grams has non-finite (NaN or Inf) entries")
    g = grams.to(torch.float64)
    norms = torch.diagonal(g, dim1=1, dim2=2).clamp(min=0.0).sqrt()  # (L, K)
    denom = norms.unsqueeze(2) * norms.unsqueeze(1)
    # Relative floor: a norm product below it is a zero row in float arithmetic.
    tiny = torch.finfo(torch.float64).tiny
    ok = denom > tiny
    cos = torch.where(ok, g / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g))
    cos = cos.clamp(-1.0, 1.0)
    iu = torch.triu_indices(k, k, offset=1)
    return cos[:, iu[0], iu[1]].mean(dim=1)


def _sizes_tensor(sizes: Sequence[int] | Tensor, n: int) -> Tensor:
    s = torch.as_tensor(sizes if isinstance(sizes, Tensor) else list(sizes))
    if s.dim() != 1 or s.numel() != n:
        raise ValueError(f"sizes must hold one count per tensor ({n}); got shape {tuple(s.shape)}")
    if s.is_floating_point() or s.dtype == torch.bool:
        raise ValueError("sizes must be integer parameter counts")
    if bool((s < 0).any()):
        raise ValueError("sizes must be non-negative")
    return s.to(torch.int64).cpu()


def _check_rule(rule: str, tau: float, m: int | None, budget: int | None) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; allowed: {', '.join(RULES)}")
    # Options that belong to another rule are a configuration mistake: say so.
    if rule != "top_m" and m is not None:
        raise ValueError(f"option m is only used by rule 'top_m', not {rule!r}")
    if rule != "budget" and budget is not None:
        raise ValueError(f"option budget is only used by rule 'budget', not {rule!r}")
    if rule == "threshold" and (not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau)):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    if rule == "top_m" and (m is None or isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"rule 'top_m' needs an int m >= 1, got {m!r}")
    if rule == "budget" and (budget is None or isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"rule 'budget' needs an int budget >= 1 (parameters), got {budget!r}")


def select(
    scores: Tensor,
    sizes: Sequence[int] | Tensor,
    *,
    rule: str = "threshold",
    tau: float = 0.0,
    m: int | None = None,
    budget: int | None = None,
) -> Tensor:
    """Boolean mask ``(L,)`` of the tensors whose objectives conflict, by ``rule``:

    * ``"threshold"``: ``c_l < tau`` (tau = 0 as in the paper's code);
    * ``"top_m"``: the ``m`` lowest scores (all when ``m >= L``);
    * ``"budget"``: lowest scores first, while the running parameter count (``sizes``) stays
      within ``budget``; stops at the first tensor that does not fit;
    * ``"all"``: every tensor.

    Ties are broken by tensor index. Never empty: when the rule selects nothing, the single
    most conflicting tensor (lowest score) is selected, even if it alone exceeds the budget.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor; got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores has non-finite (NaN or Inf) entries")
    n = scores.numel()
    s = _sizes_tensor(sizes, n)
    sc = scores.detach().to(torch.float64).cpu()
    _check_rule(rule, tau, m, budget)
    # Stable ascending order: lowest score (most conflict) first, ties by index.
    order = torch.sort(sc, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    if rule == "all":
        mask[:] = True
    elif rule == "threshold":
        mask = sc < float(tau)
    elif rule == "top_m":
        assert m is not None  # _check_rule
        mask[order[: min(m, n)]] = True
    else:  # budget
        assert budget is not None  # _check_rule
        total = 0
        for idx in order.tolist():
            total += int(s[idx])
            if total > budget:
                break
            mask[idx] = True
    if not bool(mask.any()):
        mask[order[0]] = True
    return mask.to(scores.device)


@dataclass(frozen=True)
class Selection:
    """A selection rule with its options, checked when made; ``Selection()(scores, sizes)`` is
    :func:`select` with them. The default, rule ``all``, keeps every candidate (no probe);
    the Objective Soups rule is ``Selection("threshold", tau=0.0)``."""

    rule: str = "all"
    tau: float = 0.0
    m: int | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        _check_rule(self.rule, self.tau, self.m, self.budget)

    def __call__(self, scores: Tensor, sizes: Sequence[int] | Tensor) -> Tensor:
        return select(scores, sizes, rule=self.rule, tau=self.tau, m=self.m, budget=self.budget)

    @classmethod
    def from_spec(cls, spec: Selection | Mapping[str, Any] | None) -> Selection:
        """A Selection from itself, None (the default) or a mapping that names its ``rule``
        (no guessed rule) and any of ``tau``, ``m``, ``budget``."""
        if spec is None or isinstance(spec, Selection):
            return spec or cls()
        if not isinstance(spec, Mapping):
            raise TypeError(f"selection must be a Selection, a mapping or None, got {type(spec).__name__}")
        if spec.get("rule") not in RULES:
            raise ValueError(f"selection: 'rule' must be one of {', '.join(RULES)}; got {spec.get('rule')!r}")
        unknown = sorted(set(spec) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"selection: unknown options {unknown}; allowed: rule, tau, m, budget")
        return cls(**spec)
