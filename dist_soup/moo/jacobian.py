"""Per-objective gradients of a few shared tensors in one batched backward.

For K scalar losses ``L_1..L_K`` and parameters ``theta_1..theta_n`` the Jacobian row block of
tensor ``theta_l`` is ``J_l[k] = dL_k / dtheta_l`` (shape ``(K, *theta_l.shape)``). It is the
vector-Jacobian product of the stacked losses with each basis vector ``e_k``; autograd computes
all K of them in one pass over the graph when the cotangents are batched
(``is_grads_batched=True``, a vmap over the backward), instead of K separate backward calls.

Some backward formulas have no batching rule; the batched call then raises. The function falls
back to one ``autograd.grad`` per objective and remembers it (module state, see
:func:`fallback_reason`), so later calls go straight to the loop instead of failing again.

:func:`jacobian_rows` hands out the rows objective by objective as the loop computes them, so a
caller can send objective k's rows while objective k+1's backward runs (the engine does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["jacobian", "jacobian_rows", "fallback_reason", "reset_fallback"]

# Why the batched path was abandoned (None while it is in use), and whether it has worked once.
_state: dict[str, object] = {"fallback": None, "verified": False}


def fallback_reason() -> str | None:
    """The error that made :func:`jacobian` switch to the per-objective loop, or None."""
    reason = _state["fallback"]
    return None if reason is None else str(reason)


def reset_fallback() -> None:
    """Forget a previous fallback: the next call tries the batched backward again."""
    _state["fallback"] = None
    _state["verified"] = False


def _validate(losses: Sequence[Tensor], params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The losses as 0-d tensors of one dtype and device, and the parameters, checked."""
    if isinstance(losses, Tensor):
        raise TypeError("losses must be a sequence of scalar tensors, not one tensor")
    losses = list(losses)
    params = list(params)
    if not losses:
        raise ValueError("jacobian needs at least one loss")
    if not params:
        raise ValueError("jacobian needs at least one parameter tensor")
    for k, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss {k} is a {type(loss).__name__}, expected a scalar torch.Tensor")
        if loss.numel() != 1:
            raise ValueError(f"loss {k} has shape {tuple(loss.shape)}; each loss must be a scalar")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    if not any(loss.requires_grad for loss in losses):
        raise ValueError("no loss requires grad: the losses are not connected to any parameter")
    dtype = torch.promote_types(losses[0].dtype, torch.float32)
    for loss in losses[1:]:
        dtype = torch.promote_types(dtype, loss.dtype)
    device = losses[0].device
    return [loss.reshape(()).to(dtype=dtype, device=device) for loss in losses], params


def _batched(losses: list[Tensor], params: list[Tensor], retain_graph: bool) -> list[Tensor]:
    stacked = torch.stack(losses)
    k = stacked.shape[0]
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked,
        params,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return [g.reshape(k, *p.shape) for g, p in zip(grads, params)]


def _check_rows(out: Sequence[Tensor], k: int, params: list[Tensor]) -> list[Tensor]:
    out = list(out)
    if len(out) != len(params):
        raise ValueError(f"out holds {len(out)} tensors for {len(params)} parameters")
    for i, (o, p) in enumerate(zip(out, params)):
        want = ((k, *p.shape), p.dtype, p.device)
        if not isinstance(o, Tensor) or (o.shape, o.dtype, o.device) != want or not o.is_contiguous():
            got = (tuple(o.shape), o.dtype, o.device) if isinstance(o, Tensor) else type(o).__name__
            raise ValueError(
                f"out[{i}] must be a contiguous tensor of shape {want[0]}, dtype {p.dtype} and device "
                f"{p.device}, got {got}"
            )
    return out


def _loop(
    losses: list[Tensor], params: list[Tensor], retain_graph: bool, out: list[Tensor] | None = None
) -> Iterator[tuple[int, list[Tensor]]]:
    k = len(losses)
    # Every row is written below (materialized gradients, or zeros), so no zero fill first.
    rows = out if out is not None else [torch.empty((k, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    for i, loss in enumerate(losses):
        if not loss.requires_grad:  # a constant loss: zero rows
            for row in rows:
                row[i].zero_()
        else:
            # Each loss on its own, not an entry of their stack: a backward from the stack sends
            # zero cotangents through every other objective's head as well (about 30% more
            # work per pass on msp_synth, same values). The last pass may free the graph.
            keep = retain_graph or i < k - 1
            grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True, materialize_grads=True)
            for row, g in zip(rows, grads):
                row[i].copy_(g)
        yield i, rows


def jacobian_rows(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    batched: bool = True,
    out: Sequence[Tensor] | None = None,
) -> Iterator[tuple[int, list[Tensor]]]:
    """:func:`jacobian` objective by objective: yields ``(k, rows)`` once ``rows[l][k]`` holds
    ``dL_k / d params[l]`` for every l. Earlier objectives' rows stay as they were given out;
    later ones hold no values yet (read row k only). ``rows`` is the same list every time and,
    after the last objective, what :func:`jacobian` returns. The batched backward computes every
    row at once and then yields k = 0..K-1 in turn; the loop yields after each objective's pass.

    ``out``: the rows' memory, one contiguous ``(K, *params[l].shape)`` tensor per parameter of
    its dtype and device (``rows`` is then ``out``). A caller that solves often keeps it across
    calls: fresh rows are K copies of the parameters whose every page is mapped anew on CPU.
    """
    scalars, params = _validate(losses, params)
    if out is not None:
        out = _check_rows(out, len(scalars), params)
    if batched and _state["fallback"] is None:
        keep = retain_graph or not _state["verified"]
        try:
            rows = _batched(scalars, params, keep)
        except RuntimeError as err:  # e.g. an op without a batching rule for its backward
            # Remember the fallback only if the loop works: an error the loop shares (a freed
            # graph, a bad input) is the caller's and must surface unchanged.
            yield from _loop(scalars, params, retain_graph, out)
            _state["fallback"] = f"{type(err).__name__}: {err}"
            return
        _state["verified"] = True
        if out is not None:
            for dst, src in zip(out, rows):
                dst.copy_(src)
            rows = out
        for k in range(len(scalars)):
            yield k, rows
        return
    yield from _loop(scalars, params, retain_graph, out)


def jacobian(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    batched: bool = True,
) -> list[Tensor]:
    """Per-objective gradients ``J_l`` of shape ``(K, *params[l].shape)``, one per parameter.

    ``J_l[k] = dL_k / d params[l]``; zeros where objective k does not reach ``params[l]`` (e.g.
    the head of another objective). One batched backward (``is_grads_batched``) when possible,
    else one ``autograd.grad`` per objective (never ``.backward()``, so no gradient hooks such as
    DDP's fire and ``.grad`` is untouched).

    ``retain_graph=False`` frees the graph after the call. Until the batched path has succeeded
    once in this process, its first attempt keeps the graph, so that a failure part-way through
    the graph can still fall back to the loop.
    """
    rows: list[Tensor] = []
    for _, filled in jacobian_rows(losses, params, retain_graph=retain_graph, batched=batched):
        rows = filled
    return rows
