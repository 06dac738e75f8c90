"""Gradients averaged while the backward still runs: the overlap of DDP's reducer, compressed.

A :class:`GradientReducer` cuts a model's parameters into buckets, in reverse order of
registration (about the order in which the backward produces their gradients), each closing
once it holds ``bucket_mb`` (DDP's rule: a bias travels with the weight after it), and puts a
post-accumulate-grad hook on every parameter. During an *armed* backward, once every parameter
of bucket j holds its gradient and buckets ``0..j-1`` have been launched, bucket j's compressed
mean is launched (``Exchange.mean_many_async``) and travels while the backward computes the
earlier layers. :meth:`GradientReducer.finish` then launches the buckets the backward did not
reach (a parameter without a gradient contributes zeros), waits for all of them and leaves
every mean in its ``.grad``, identical on every rank.

Buckets leave strictly in index order whatever order the gradients arrive in, so every rank
issues the same collectives in the same order even when the ranks' graphs differ (parameters
unused on some ranks). Bucket j's encode runs in the hook, on the thread that runs the
backward; the wire transfer runs on the transport's own threads.

Non-finite gradients: every call of the exchange tells every rank whether some rank's input
was not finite, at its launch (control collective) or, on a layout already agreed, with its
payloads (status words). The reducer then waits for everything launched, puts back every
stream those calls touched (the exchange's journal) and reports the step as failed on every
rank: no residue absorbs a NaN, and no rank steps while another skips.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from .agreement import NonFiniteError
from .buckets import megabytes
from .exchange import Exchange, ExchangeHandle, wait_all


class GradientReducer:
    """Compressed gradient means over the ranks, launched bucket by bucket during the backward.

    Args:
        params: ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``), the same
            names on every rank; streams are named ``prefix + name``.
        exchange: the compressed collective (its ``stats`` count the bytes).
        bucket_mb: a launch unit closes once it holds this much. Each launch is one exchange
            call and (per exchange bucket or piece) one collective, about 0.3 to 0.4 ms of the
            training thread's CPU on the project's 2-core VM whatever its size, so fewer, fuller
            launches cost less; the last one decides how much travels after the backward.
    """

    def __init__(
        self,
        params: Sequence[tuple[str, torch.nn.Parameter]],
        exchange: Exchange,
        *,
        bucket_mb: float = 4.0,
        prefix: str = "U/",
    ) -> None:
        bucket_mb = megabytes("bucket_mb", bucket_mb)
        self.params = list(params)
        if len({n for n, _ in self.params}) != len(self.params):
            raise ValueError("params: parameter names must be unique")
        self.exchange = exchange
        self.prefix = prefix
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._plans: dict[frozenset[str], tuple[list[list[int]], dict[int, int]]] = {}
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, (_, p) in enumerate(self.params)]

    # --- one synchronised backward ------------------------------------------------------------
    def arm(self, exclude: Collection[str] = ()) -> None:
        """Exchange the gradients of the next backward (all parameters but those in ``exclude``,
        whose gradients the caller averages otherwise) as they become ready."""
        if self._armed:
            raise RuntimeError("the reducer is already armed: call finish() after the backward")
        key = frozenset(exclude)
        if key not in self._plans:
            self._plans[key] = self._plan(key)
        self._buckets, self._bucket_of = self._plans[key]
        self._waiting = [len(b) for b in self._buckets]
        self._next = 0
        self._handles: list[ExchangeHandle] = []
        self._journal: dict = {}
        self._nonfinite: NonFiniteError | None = None
        self._armed = True

    def finish(self) -> bool:
        """After the backward: launch the rest, wait, leave the means in ``.grad``. False (on every
        rank alike) when some rank's gradient was not finite: every gradient is then set to None
        and every stream is back to its state before :meth:`arm`."""
        if not self._armed:
            raise RuntimeError("finish() without arm()")
        try:
            while self._next < len(self._buckets) and self._nonfinite is None:
                self._launch(self._next)
            _, nonfinite = wait_all(self._handles)  # learnt from the payloads (an agreed layout)
            self._nonfinite = self._nonfinite or nonfinite
        finally:
            self._armed = False
            self._handles = []
        if self._nonfinite is None:
            return True
        self.exchange.restore(self._journal)
        for _, p in self.params:
            p.grad = None
        return False

    def abandon(self) -> None:
        """The backward failed: let what was launched complete and disarm (no step)."""
        if not self._armed:
            return
        try:
            wait_all(self._handles)
        except BaseException:  # the backward's own error is the one worth reporting
            pass
        self.exchange.restore(self._journal)
        self._armed = False
        self._handles = []

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- internals ----------------------------------------------------------------------------
    def _plan(self, exclude: frozenset[str]) -> tuple[list[list[int]], dict[int, int]]:
        buckets: list[list[int]] = []
        size = 0
        for i in reversed(range(len(self.params))):
            name, p = self.params[i]
            if name in exclude or not p.requires_grad:
                continue
            if not buckets or size >= self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += p.numel() * p.element_size()
        return buckets, {i: j for j, b in enumerate(buckets) for i in b}

    def _hook(self, i: int):
        def ready(_: torch.Tensor) -> None:
            if not self._armed:
                return  # a local backward (no_sync, evaluation): nothing to exchange
            j = self._bucket_of.get(i)
            if j is None:
                return
            if j < self._next:
                raise RuntimeError(
                    f"parameter {self.params[i][0]!r} received a second gradient in one synchronised "
                    "backward, after its bucket was exchanged; accumulate micro-batches under no_sync()"
                )
            self._waiting[j] -= 1
            while self._next < len(self._buckets) and self._waiting[self._next] <= 0 and self._nonfinite is None:
                self._launch(self._next)

        return ready

    def _launch(self, j: int) -> None:
        self._next = j + 1
        grads = {}
        for i in self._buckets[j]:
            name, p = self.params[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            grads[self.prefix + name] = p.grad
        try:
            # the means land in the gradients themselves (out=)
            self._handles.append(self.exchange.mean_many_async(grads, out=grads, journal=self._journal))
        except NonFiniteError as exc:  # raised on every rank at this same bucket
            self._nonfinite = exc
