"""The torch DDP baseline as a training engine (``train.engine: ddp``).

One step: the sum of the losses, backward through ``torch.nn.parallel.DistributedDataParallel``
with one of torch's own comm hooks (``ddp.hook``: none = DDP's fp32 all-reduce, fp16 =
``fp16_compress_hook``, powersgd = ``powerSGD_hook``), then the optimizer step. ``DDPBaseline``
offers what ``dist_soup.train`` uses of ``SoupEngine`` (``step`` returning a ``StepResult``,
``model``, the step and skip counters, ``state_dict``, ``transport``), so a DDP run writes the
same metrics.jsonl, checkpoints and summary.json as a dist_soup run, and
``benchmarks/e2e_worker.py`` times this same step.

Only the mean losses (for the log, one tiny all-reduce after the backward) are added to what a
DDP user's loop does. A non-finite loss or gradient on any rank skips the step on every rank
(``train.nonfinite: skip``) or raises (``raise``): the all-reduced
gradients and mean losses are identical on every rank, so every rank decides the same.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from .config import ConfigError, DDPConfig
from .engine import StepResult


class _AllReduceBytes:
    """Counts the bytes that torch's comm hooks hand to ``dist.all_reduce`` while ``active``.

    The hooks call it as a module attribute, so wrapping the attribute sees every call,
    including PowerSGD's second all-reduce, launched from a future's callback (on a gloo
    thread: hence a flag, not a context variable). DDP's backward waits for every bucket's
    future, so counting over the backward sees the whole step."""

    def __init__(self) -> None:
        self.bytes = 0
        self.active = False
        self._orig = dist.all_reduce
        counter = self

        def all_reduce(tensor, *args, **kwargs):
            if counter.active:
                counter.bytes += tensor.numel() * tensor.element_size()
            return counter._orig(tensor, *args, **kwargs)

        self._wrapper = all_reduce
        dist.all_reduce = all_reduce

    def close(self) -> None:
        if dist.all_reduce is self._wrapper:  # put back only what we replaced
            dist.all_reduce = self._orig


class DDPBaseline:
    """``DistributedDataParallel(model)`` with ``cfg.hook`` and ``optimizer``, as an engine.

    ``model`` is the DDP wrapper: the forward must run through it for the reducer to work.
    ``find_unused_parameters``: some parameters get no gradient (e.g. the heads of the task's
    objectives left out by ``task.objectives``), which DDP must then look for every step.
    Needs an initialised torch.distributed process group.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        objectives,
        cfg: DDPConfig,
        *,
        nonfinite: str = "skip",
        seed: int = 0,
        find_unused_parameters: bool = False,
    ) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from .comm.transport import TorchTransport

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "train.engine: 'ddp' runs on torch.distributed: start with --nproc N or torchrun "
                "(not a single process, not mpirun)"
            )
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite={nonfinite!r}: use 'skip' or 'raise'")
        self.objectives = tuple(objectives)
        self.module = model
        device = next(model.parameters()).device
        self.model = DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.bucket_mb,
            find_unused_parameters=find_unused_parameters,
        )
        self.optimizer = optimizer
        self.hook, self.nonfinite = cfg.hook, nonfinite
        self.transport = TorchTransport()
        self.rank, self.world_size = self.transport.rank, self.transport.world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dense = sum(p.numel() * p.element_size() for p in self.params)
        self.step_count = 0
        self.skipped_steps = 0
        self.w = torch.ones(len(self.objectives))  # the sum of the losses
        self.selected: list[str] = []  # no layer selection
        self.powersgd = None
        self._counter = None
        if cfg.hook == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self.model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif cfg.hook == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            self.powersgd = psgd.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=cfg.powersgd_rank,
                start_powerSGD_iter=cfg.powersgd_start,
                random_seed=seed,
            )
            self.model.register_comm_hook(self.powersgd, psgd.powerSGD_hook)
        if cfg.hook != "none":
            self._counter = _AllReduceBytes()

    def step(self, losses: Mapping[str, torch.Tensor], *, epoch: float | None = None) -> StepResult:
        """Sum of ``losses``, backward (DDP all-reduces the gradients), optimizer step.
        ``epoch`` is accepted for ``SoupEngine.step``'s signature; no schedule uses it."""
        missing = [k for k in self.objectives if k not in losses]
        if missing or len(losses) != len(self.objectives):
            raise ValueError(f"losses: expected exactly {list(self.objectives)}, got {list(losses)}")
        t0 = time.perf_counter()
        mean = torch.stack([losses[k].detach().float() for k in self.objectives])
        self.optimizer.zero_grad(set_to_none=True)
        before = self._counter.bytes if self._counter else 0
        if self._counter:
            self._counter.active = True
        try:
            total: torch.Tensor = sum(losses[k] for k in self.objectives)  # type: ignore[assignment]
            total.backward()
        finally:
            if self._counter:
                self._counter.active = False
        tb = time.perf_counter()
        # After the backward, not launched before it: PowerSGD's hook issues its all-reduces from
        # future callbacks, and a collective of ours in flight beside them can leave the ranks'
        # gloo queues in different orders (a size mismatch that aborts the run).
        dist.all_reduce(mean)
        mean /= self.world_size
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = bool(torch.isfinite(mean).all()) and bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if not finite and self.nonfinite == "raise":
            raise FloatingPointError(f"step {self.step_count}: non-finite loss or gradient on at least one rank")
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        to = time.perf_counter()
        # DDP's own path all-reduces every fp32 bucket once per step: the parameters' bytes.
        sent = self._counter.bytes - before if self._counter else self.dense
        self.step_count += 1
        return StepResult(
            step=self.step_count - 1,
            losses={k: float(v) for k, v in zip(self.objectives, mean.tolist())},
            weights={k: 1.0 for k in self.objectives},
            solved=False,
            probed=False,
            selected=[],
            skipped=not finite,
            bytes_sent=sent,
            bytes_received=sent,
            dense_bytes=self.dense,
            timings={"backward_s": tb - t0, "optimizer_s": to - tb, "step_s": to - t0},
        )

    def state_dict(self) -> dict:
        return {"step": self.step_count, "skipped": self.skipped_steps, "w": self.w.clone()}

    def load_state_dict(self, state: dict) -> None:
        if self.powersgd is not None and int(state["step"]) > 0:
            # Its error-feedback and warm-start memories are kept per DDP bucket, and DDP lays its
            # buckets out afresh after a new wrapper's first step, so they cannot be put back.
            raise ConfigError(
                "--resume: a ddp.hook 'powersgd' run cannot continue from a checkpoint (PowerSGD's "
                "memories are kept per DDP bucket, which DDP rebuilds); rerun it from the start"
            )
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped"])

    def summary(self) -> dict:
        """PowerSGD's own compression figures (over the steps it compressed), else {}."""
        if self.powersgd is None:
            return {}
        rate, _, _ = self.powersgd.compression_stats()
        return {"powersgd": {"iter": self.powersgd.iter, "compress_rate": rate}}

    def close(self) -> None:
        if self._counter:
            self._counter.close()
            self._counter = None
