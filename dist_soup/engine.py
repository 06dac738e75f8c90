"""The soup step (DESIGN section 1): after the user's forward, everything up to the update.

For P workers and K objectives, ``SoupEngine.backward(losses)`` runs::

    2. J^p  = per-objective gradients of every parameter                 (K backward passes)
    3. Jbar = compressed mean of J^p's rows on the selected shared       (comm.Exchange "J";
              tensors S over the workers                                  objective k's rows
                                                                          leave during pass k+1)
    4. sum_p G^p, G^p = Jhat^p Jhat^p^T from each worker's decoded rows  (one tiny all-reduce)
    5. rank 0: Gram estimate -> layer selection (probe steps) -> recipe -> lambda, broadcast
    6. backward of sum_k w_k L_k; the compressed mean of the gradient     (comm.Exchange "U")
       leaves bucket by bucket *during* that backward (comm.reducer), and lands in .grad;
       on solve steps the rows give sum_k w_k g_k without a further backward, S's rows
       their mean Jbar^T w, and only the other tensors' gradients travel

and ``SoupEngine.step(losses)`` is zero_grad, ``backward`` and ``optimizer.step()``.

Steps 2-5 run on *solve* steps only (every ``solve_every`` steps and on every probe step), and
only when some level of the recipe needs a Gram: loss-based weightings (``ew``, ``famo``,
``dwa``) are computed by every rank from the agreed mean losses, with no Jacobian, no exchange
of it and no broadcast, so their step costs what compressed data parallelism costs. In between
solves the last weights are reused. Every rank ends a step with bit-identical gradients: the
exchanges return the same tensors on every rank and the weights come from rank 0 (or from the
same agreed inputs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .comm import Exchange, NonFiniteError, wait_all
from .comm.reducer import GradientReducer
from .moo import gram as grams
from .moo import selection
from .moo.jacobian import jacobian_rows
from .moo.recipe import Recipe, build_recipe
from .moo.selection import Selection
from .moo.solvers import Solver

COORDINATOR = 0


@dataclass
class StepResult:
    """What one ``SoupEngine.step`` did (all values identical on every rank)."""

    step: int
    losses: dict[str, float]  # mean over the ranks
    weights: dict[str, float]  # w: the weight of each loss in the backward
    solved: bool  # the weighting was recomputed this step
    probed: bool  # layer selection was recomputed this step
    selected: list[str]  # names of the shared tensors in S
    skipped: bool = False  # a non-finite loss or gradient on some rank: no update
    bytes_sent: int = 0  # this rank, this step, both exchanges
    bytes_received: int = 0
    dense_bytes: int = 0  # what fp32 would have sent
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # per-level lambdas and etas of the recipe


def _shared_parameters(
    model: nn.Module, shared: nn.Module | str | Iterable[nn.Parameter]
) -> list[tuple[str, nn.Parameter]]:
    """Resolve ``shared`` (a submodule, its dotted name, or parameters) to named parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(shared, str):
        try:
            module = model.get_submodule(shared)
        except AttributeError:
            raise ValueError(f"shared={shared!r}: the model has no submodule of that name") from None
        params = list(module.parameters())
    elif isinstance(shared, nn.Module):
        params = list(shared.parameters())
    else:
        params = list(shared)
    out = []
    for p in params:
        if id(p) not in names:
            raise ValueError("shared: a parameter is not a parameter of the model")
        if p.requires_grad:
            out.append((names[id(p)], p))
    if not out:
        raise ValueError("shared owns no trainable parameters; name the shared trunk of the model")
    return out


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Adds the block's wall time to ``timings[key]`` (the step's breakdown in StepResult)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


class SoupEngine:
    """Distributed multi-objective training step with compressed communication.

    Args:
        model: the whole model (shared trunk and heads), identical on every rank; rank 0's
            parameters are broadcast at construction, as DDP does.
        optimizer: any torch optimizer over the model's parameters; None when only
            :meth:`backward` is used (the caller, e.g. DeepSpeed, owns the optimizer).
        objectives: the objective names, in the order of the Jacobian rows.
        shared: the shared trunk (a submodule, its dotted name or its parameters): the
            candidates of layer selection. Heads are never candidates. May be left out with a
            single objective (plain compressed data parallelism).
        recipe: a :class:`~dist_soup.moo.recipe.Recipe`, or "vs" / "vc" / "vm" built with
            ``groups``, ``solver`` (a name with ``solver_options``, or a Solver object such as
            ``MGDA(momentum=0.9)``), ``order`` (vm: the group names, one level each, e.g.
            ``("asr", "st", "ssl")``), ``constraint`` (vc: the penalty group) and ``eta``.
        gram: "cross" (unbiased cross-worker estimate), "plain" (Jbar Jbar^T) or "auto"
            (cross when P > 1).
        selection: a :class:`~dist_soup.moo.selection.Selection` (or a mapping naming its
            ``rule`` and any of ``tau``, ``m``, ``budget``); None: rule ``all`` (every candidate,
            no probe). ``probe_every`` steps between probes. The Objective Soups rule is
            ``Selection("threshold", tau=0.0)`` (the quickstart uses it): cheaper solves, at
            some cost in quality on our benchmark (README, "Engine overhead").
        solve_every: recompute the weighting every this many steps.
        jacobian_compressor / update_compressor: codec names (with ``*_options``) for the
            exchange of the Jacobian rows and of the update; ``mode`` the collective.
        overlap_mb: the update's launch unit: a bucket of gradients this large leaves as soon
            as the backward has produced it (:class:`~dist_soup.comm.reducer.GradientReducer`).
        reuse_jacobian: the rows of S take ``Jbar^T w`` on solve steps instead of a second
            exchange.
        batched_jacobian: one vmap'd backward for the K rows (``is_grads_batched``) instead of
            K backward passes (the default: faster on CPU as measured here).
        nonfinite: "skip" (all ranks skip the step, counted in ``skipped_steps``) or "raise".
            Either way no residue ever sees a non-finite value.
        steps_per_epoch: converts the step counter into the epoch of the penalty schedules
            when ``step`` is not given ``epoch``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        objectives: Sequence[str],
        shared: nn.Module | str | Iterable[nn.Parameter] | None = None,
        recipe: Recipe | str = "vs",
        *,
        groups: Mapping[str, Sequence[str]] | None = None,
        solver: str | Solver = "mgda",
        solver_options: Mapping | None = None,
        order: Sequence[str] | None = None,
        constraint: str | None = None,
        eta=None,
        gram: str = "auto",
        selection: Selection | Mapping | None = None,
        probe_every: int = 100,
        solve_every: int = 25,
        jacobian_compressor: str = "qsgd",
        jacobian_options: Mapping | None = None,
        update_compressor: str = "qsgd",
        update_options: Mapping | None = None,
        mode: str = "allgather",
        bucket_mb: float = 25.0,
        overlap_mb: float = 4.0,
        reuse_jacobian: bool = True,
        batched_jacobian: bool = False,
        nonfinite: str = "skip",
        steps_per_epoch: int = 1,
        seed: int = 0,
        transport=None,
        group=None,
    ) -> None:
        self.objectives = tuple(objectives)
        if not self.objectives:
            raise ValueError("objectives: need at least one objective name")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"objectives: duplicate names in {list(self.objectives)}")
        if gram not in ("auto", "cross", "plain"):
            raise ValueError(f"gram={gram!r}: use 'auto', 'cross' or 'plain'")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite={nonfinite!r}: use 'skip' or 'raise'")
        counts = (("solve_every", solve_every), ("probe_every", probe_every), ("steps_per_epoch", steps_per_epoch))
        for key, value in counts:
            if int(value) < 1:
                raise ValueError(f"{key}={value!r}: must be a positive integer")
        if shared is None and len(self.objectives) > 1:
            raise ValueError(
                "shared: name the shared trunk (a submodule, its name or its parameters); "
                "only a single objective may leave it out"
            )
        self.model = model
        self.optimizer = optimizer
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._param = dict(self.params)
        # With one objective there is no weighting, so no candidate for selection is needed.
        self.candidates = _shared_parameters(model, shared) if shared is not None else []
        if isinstance(recipe, str):
            recipe = build_recipe(
                recipe,
                self.objectives,
                dict(groups or {}),
                solver=solver,
                solver_options=dict(solver_options or {}),
                order=order,
                constraint=constraint,
                eta=eta,
            )
        recipe.check_names(self.objectives)
        # the epoch this engine's callers pass is step / steps_per_epoch: schedules in steps read it back
        recipe.set_run_length(steps_per_epoch=steps_per_epoch)
        self.recipe = recipe
        self.selection = Selection.from_spec(selection)
        self.probe_every = int(probe_every)
        self.solve_every = int(solve_every)
        self.reuse_jacobian = reuse_jacobian
        self.batched_jacobian = batched_jacobian
        self.nonfinite = nonfinite
        self.steps_per_epoch = int(steps_per_epoch)

        common = dict(mode=mode, group=group, transport=transport, bucket_mb=bucket_mb, seed=seed)
        self.j_exchange = Exchange(jacobian_compressor, **common, **dict(jacobian_options or {}))
        # The reducer's buckets are the update's pipeline (each leaves while the backward goes
        # on), so its exchange does not cut tensors into pieces: a piece is one more collective.
        self.u_exchange = Exchange(update_compressor, **common, chunk_mb=None, **dict(update_options or {}))
        self.reducer = GradientReducer(self.params, self.u_exchange, bucket_mb=overlap_mb)
        self._local_only = False  # inside no_sync()
        self.transport = self.u_exchange.transport
        self.rank = self.transport.rank
        self.world_size = self.transport.world_size
        self.gram = ("cross" if self.world_size > 1 else "plain") if gram == "auto" else gram
        if self.gram == "cross" and self.world_size < 2:
            raise ValueError("gram='cross' needs at least 2 ranks; use 'plain' or 'auto'")
        self.device = self.params[0][1].device

        self.step_count = 0
        self.skipped_steps = 0
        self.mask = torch.ones(len(self.candidates), dtype=torch.bool)
        self.w = torch.full((len(self.objectives),), 1.0 / len(self.objectives))
        self.last_info: dict = {}
        # Solve steps' working memory on CPU (see _buffer).
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._broadcast_model()

    # --- public ----------------------------------------------------------------------------
    @property
    def selected(self) -> list[str]:
        return [n for (n, _), keep in zip(self.candidates, self.mask.tolist()) if keep]

    def backward(self, losses: Mapping[str, torch.Tensor], *, epoch: float | None = None) -> StepResult:
        """Steps 2 to 6 of the soup step for this rank's ``losses`` (name -> scalar tensor), up to
        and including the compressed mean in every ``.grad``; the optimizer is the caller's.

        Like ``loss.backward()`` under DDP: gradients accumulate into ``.grad`` (zero them
        yourself), and on return each holds the mean over the ranks, identical on every rank, so
        clipping, GradScaler, schedulers and ``optimizer.step()`` work as with DDP. Under
        :meth:`no_sync` the backward only accumulates locally (no collective at all).
        ``result.skipped``: some rank's loss or gradient was not finite; every rank's gradients
        are then None and no residue changed.
        """
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        loss_list = self._check_losses(losses)
        if self._local_only:
            with _timed(timings, "backward_s"):
                sum(w * l for w, l in zip(self.w.tolist(), loss_list)).backward()
            local = torch.stack([l.detach().double() for l in loss_list])
            return self._result(local, False, False, False, timings, step=self.step_count)
        if epoch is None:
            epoch = self.step_count / self.steps_per_epoch
        # With one objective there is nothing to weigh: plain (compressed) training.
        multi = len(self.objectives) > 1
        # Only Gram-based weightings need a Jacobian; selection (and so a probe) only serves them.
        gram_based = multi and self.recipe.needs_gram
        probed = gram_based and self.selection.rule != "all" and self.step_count % self.probe_every == 0
        solved = multi and (probed or self.step_count % self.solve_every == 0)

        # Agree on the losses (their mean drives loss-based solvers and the logs) and on
        # whether any rank saw a non-finite loss: one tiny all-reduce for both.
        local = torch.stack([l.detach().double() for l in loss_list] + [torch.zeros((), dtype=torch.float64)])
        bad = ~torch.isfinite(local[:-1]).all()
        local[-1] = float(bad)
        local[:-1] = torch.where(torch.isfinite(local[:-1]), local[:-1], torch.zeros_like(local[:-1]))
        self._all_reduce(local)
        mean_losses = local[:-1] / self.world_size
        if local[-1] > 0:
            return self._skip("loss", mean_losses, probed, solved, t0, timings)

        if solved and gram_based:
            return self._solve_step(loss_list, mean_losses, probed, epoch, t0, timings)
        if solved:
            # Loss-based (or fixed) weights: every rank computes the same w from the same agreed
            # losses and the same solver state, so nothing is exchanged or broadcast.
            with _timed(timings, "solve_s"):
                w, self.last_info = self.recipe.weights(None, mean_losses, self.objectives, epoch)
                self.w = w.float()

        weighted = sum(w * l for w, l in zip(self.w.tolist(), loss_list))
        self.reducer.arm()
        with _timed(timings, "backward_s"):
            try:
                weighted.backward()  # buckets leave as their gradients become ready
            except BaseException:
                self.reducer.abandon()
                raise
        with _timed(timings, "update_exchange_s"):  # what the backward did not hide
            done = self.reducer.finish()  # False on every rank alike, residues already restored
        if not done:
            return self._skip("gradient", mean_losses, probed, solved, t0, timings)
        self.step_count += 1
        timings["step_s"] = time.perf_counter() - t0
        return self._result(mean_losses, solved, probed, False, timings)

    def _solve_step(self, loss_list, mean_losses, probed, epoch, t0, timings) -> StepResult:
        """A solve step of a Gram-based recipe. The per-objective gradients of *every*
        parameter (K backward passes) give both the Jacobian on S and, once w is known, the
        weighted gradient ``sum_k w_k g_k``: no further backward. Rows of S were exchanged
        already, so their mean update is ``Jbar^T w`` (identical on every rank) and they skip
        the update exchange; the other gradients go through it."""
        solved = self._solve(loss_list, mean_losses, probed, epoch, timings)
        if solved is None:
            return self._skip("Jacobian", mean_losses, probed, True, t0, timings)
        rows, reused = solved
        w = self.w.to(self.device)
        with _timed(timings, "backward_s"):
            for name, p in self.params:
                if name in reused:
                    continue
                g = torch.tensordot(w.to(rows[name].dtype), rows[name], dims=1).to(p.dtype)
                p.grad = g if p.grad is None else p.grad.add_(g)
        with _timed(timings, "update_exchange_s"):
            self.reducer.arm(exclude=reused)
            done = self.reducer.finish()
            for name, jbar in reused.items():
                p = self._param[name]
                p.grad = torch.tensordot(w.to(jbar.dtype), jbar, dims=1).to(p.dtype)
        if not done:
            return self._skip("gradient", mean_losses, probed, True, t0, timings)
        self.step_count += 1
        timings["step_s"] = time.perf_counter() - t0
        return self._result(mean_losses, True, probed, False, timings)

    def step(self, losses: Mapping[str, torch.Tensor], *, epoch: float | None = None) -> StepResult:
        """One optimizer step: zero the gradients, :meth:`backward`, ``optimizer.step()``
        (unless some rank's loss or gradient was not finite)."""
        if self.optimizer is None:
            raise ValueError(
                "step() needs the optimizer; this engine was built with optimizer=None "
                "(call backward() and step your optimizer yourself)"
            )
        if self._local_only:
            raise RuntimeError("step() inside no_sync(): call backward() there, step() outside")
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        res = self.backward(losses, epoch=epoch)
        if not res.skipped:
            with _timed(res.timings, "optimizer_s"):
                self.optimizer.step()
        res.timings["step_s"] = time.perf_counter() - t0
        return res

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backwards inside only accumulate this rank's gradients (weighted by the current w):
        no collective, no solve, no step counted. The next :meth:`backward` outside exchanges
        the accumulated gradients once (gradient accumulation, as with DDP's ``no_sync``)."""
        outer, self._local_only = self._local_only, True
        try:
            yield
        finally:
            self._local_only = outer

    # --- the solve: steps 2-5 --------------------------------------------------------------
    def _solve(self, loss_list, mean_losses, probed, epoch, timings):
        """Steps 2-5. Returns (this rank's rows ``dL_k/dtheta`` of every parameter, the mean
        rows Jbar of the tensors of S when they may serve as their update, else {}), or None
        when some rank's rows were not finite (every J stream is then back to its state before
        this step, whatever rows had left already)."""
        S = self.candidates if probed else [c for c, keep in zip(self.candidates, self.mask.tolist()) if keep]
        K = len(self.objectives)
        # The means of S's rows are their update unless gradients are being accumulated (.grad
        # holds earlier micro-batches) or there is one rank (the local rows are then exact).
        reuse = self.reuse_jacobian and self.world_size > 1 and all(p.grad is None for _, p in S)
        cross = self.gram == "cross"  # only the cross estimate needs each rank's own decode
        handles: list = []
        journal: dict = {}  # the J streams' states before this step, for a non-finite row
        nonfinite = False
        try:
            with _timed(timings, "jacobian_s"):
                # K backward passes through the whole model: the loop beat the vmap'd batched
                # backward on CPU (README, "Engine overhead"); the graph is not needed afterwards.
                # Objective k's rows of S leave while objective k+1's backward runs.
                params = [p for _, p in self.params]
                rows = {name: self._buffer("rows", name, (K, *p.shape), p) for name, p in self.params}
                # Jbar: the means overwrite S's rows in place when they serve as the update.
                jbar = {name: rows[name] if reuse else self._buffer("mean", name, (K, *p.shape), p) for name, p in S}
                local = {name: self._buffer("local", name, (K, *p.shape), p) for name, p in S} if cross else {}
                for k, _ in jacobian_rows(
                    loss_list, params, retain_graph=False, batched=self.batched_jacobian, out=list(rows.values())
                ):
                    keys = {name: f"J/{self.objectives[k]}/{name}" for name, _ in S}
                    named = {key: rows[name][k] for name, key in keys.items()}
                    out_mean = {key: jbar[name][k] for name, key in keys.items()}
                    out_local = {key: local[name][k] for name, key in keys.items()} if cross else None
                    try:
                        handles.append(
                            self.j_exchange.mean_many_async(
                                named, return_local=cross, out=out_mean, local_out=out_local, journal=journal
                            )
                        )
                    except NonFiniteError:  # raised on every rank alike, before this call changed anything
                        nonfinite = True
                        break  # the step is skipped: no further rows
            with _timed(timings, "jacobian_exchange_s"):  # what the backward passes did not hide
                _, late = wait_all(handles)  # late: learnt from the payloads (an agreed layout)
                nonfinite = nonfinite or late is not None
        except BaseException:
            try:
                wait_all(handles)
            except BaseException:  # the first error is the one worth reporting
                pass
            self.j_exchange.restore(journal)
            raise
        if nonfinite:
            self.j_exchange.restore(journal)
            return None

        with _timed(timings, "gram_s"):
            # Every rank adds its own Grams to the sum; only the coordinator, which solves, forms
            # the estimate (its Grams of Jbar while the sum is in flight).
            summed = None
            if cross:  # this rank's decoded rows landed in local (local_out)
                sum_local = grams.local_grams([local[name] for name, _ in S]).double().contiguous()
                summed = self.transport.all_reduce_async_(sum_local, "sum")
            if self.rank == COORDINATOR:
                per_tensor = grams.local_grams([jbar[n] for n, _ in S]).double()
                if summed is not None:
                    per_tensor = grams.cross_gram(per_tensor, summed.wait(), self.world_size)
            elif summed is not None:
                summed.wait()

        with _timed(timings, "solve_s"):
            # The coordinator decides; everyone receives [w (K), mask (|candidates|)].
            decision = torch.zeros(K + len(self.candidates), dtype=torch.float64)
            if self.rank == COORDINATOR:
                if probed:
                    scores = selection.conflict_scores(grams.psd_clip(per_tensor))
                    sizes = torch.tensor([p.numel() for _, p in S])
                    mask = self.selection(scores, sizes)
                else:
                    mask = torch.ones(len(S), dtype=torch.bool)
                G = per_tensor[mask].sum(0)
                grams.check_finite(G, "Gram estimate")
                w, info = self.recipe.weights(G, mean_losses, self.objectives, epoch)
                self.last_info = info
                decision[:K] = w.double()
                decision[K:] = (mask if probed else self.mask).double()
            self.transport.broadcast_(decision, COORDINATOR)
            self.w = decision[:K].float()
            if probed:
                self.mask = decision[K:] > 0.5
        return rows, (jbar if reuse else {})

    # --- helpers ---------------------------------------------------------------------------
    def _buffer(self, kind: str, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Solve-step memory ``kind`` of parameter ``name`` (contents undefined).

        On CPU it is kept from one solve step to the next (K rows of every parameter and of S):
        memory the allocator hands back to the system costs a page fault per 4 KiB when it is
        written again, about 0.4 ms per MB on the dev VM (the stack of the local rows alone took
        20-30 ms of a solve step at the README's size). CUDA's caching allocator already reuses
        freed blocks, and a buffer kept there would only take memory from the plain steps'
        activations."""
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        buf = self._buffers.get((kind, name))
        if buf is None or (buf.shape, buf.dtype, buf.device) != (shape, like.dtype, like.device):
            buf = self._buffers[(kind, name)] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _check_losses(self, losses: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict name -> scalar tensor, got {type(losses).__name__}")
        missing = [k for k in self.objectives if k not in losses]
        extra = [k for k in losses if k not in self.objectives]
        if missing or extra:
            raise ValueError(f"losses: missing {missing}, unknown {extra}; expected exactly {list(self.objectives)}")
        out = []
        for k in self.objectives:
            l = losses[k]
            if not isinstance(l, torch.Tensor) or l.numel() != 1:
                raise ValueError(f"loss {k!r} must be a scalar tensor, got {getattr(l, 'shape', type(l))}")
            if not l.requires_grad:
                raise ValueError(f"loss {k!r} does not require grad: it must come from the model's forward")
            out.append(l.reshape(()))
        return out

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.world_size > 1:
            self.transport.all_reduce_(t, "sum")

    def _broadcast_model(self) -> None:
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                self.transport.broadcast_(t.data, COORDINATOR)

    def _bytes(self) -> tuple[int, int, int]:
        s = [self.j_exchange.stats, self.u_exchange.stats]
        return (sum(x.bytes_sent for x in s), sum(x.bytes_received for x in s), sum(x.dense_bytes for x in s))

    def _skip(self, what, mean_losses, probed, solved, t0, timings) -> StepResult:
        for _, p in self.params:
            p.grad = None
        if self.nonfinite == "raise":
            raise FloatingPointError(f"step {self.step_count}: non-finite {what} on at least one rank")
        self.skipped_steps += 1
        self.step_count += 1
        timings["step_s"] = time.perf_counter() - t0
        return self._result(mean_losses, False, False, True, timings)

    def _result(self, mean_losses, solved, probed, skipped, timings, step=None) -> StepResult:
        sent, recv, dense = self._bytes()
        prev = getattr(self, "_bytes_mark", (0, 0, 0))
        self._bytes_mark = (sent, recv, dense)
        return StepResult(
            step=self.step_count - 1 if step is None else step,
            losses={k: float(v) for k, v in zip(self.objectives, mean_losses.tolist())},
            weights={k: float(v) for k, v in zip(self.objectives, self.w.tolist())},
            solved=solved,
            probed=probed,
            selected=self.selected,
            skipped=skipped,
            bytes_sent=sent - prev[0],
            bytes_received=recv - prev[1],
            dense_bytes=dense - prev[2],
            timings=timings,
            info=self.last_info if solved else {},
        )

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's engine state: weights, selection, recipe state and exchange residues."""
        return {
            "step": self.step_count,
            "skipped": self.skipped_steps,
            "w": self.w.clone(),
            "mask": self.mask.clone(),
            "recipe": self.recipe.state_dict(),
            "j_exchange": self.j_exchange.state_dict(),
            "u_exchange": self.u_exchange.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["mask"].numel() != len(self.candidates) or state["w"].numel() != len(self.objectives):
            raise ValueError("engine state does not match this model and objectives")
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped"])
        self.w = state["w"].clone().float()
        self.mask = state["mask"].clone().bool()
        self.recipe.load_state_dict(state["recipe"])
        self.j_exchange.load_state_dict(state["j_exchange"])
        self.u_exchange.load_state_dict(state["u_exchange"])
