"""DeepSpeed plugin: dist_soup's compressed exchange and the soup step inside ``deepspeed.initialize``.

For DeepSpeed users, one changed line::

    from dist_soup.integrations import deepspeed as ds_soup
    engine, optimizer, loader, scheduler = ds_soup.initialize(model=net, model_parameters=net.parameters(),
                                                              config="ds_config.json")
    loss = loss_fn(engine(x), y)
    engine.backward(loss)          # the gradient mean travels compressed, not through DeepSpeed's all-reduce
    engine.step()
    ds_soup.stats(engine)          # bytes sent / received, fp32 bytes, seconds

``config`` is DeepSpeed's own config (a dict or a JSON path) plus one section ``"dist_soup"``
whose keys are the project's config keys (:class:`dist_soup.config.DeepSpeedSection`, checked
by the same code as the YAML config): ``compression`` (``update``, ``jacobian``, ``mode``,
``bucket_mb``) and, for several objectives, ``objectives``, ``shared`` (the name of the model's
shared trunk submodule), ``groups``, ``recipe``, ``solver``, ``selection``, ``solve_every``,
``gram``, ``nonfinite``. With several objectives ``engine.backward({"asr": l1, "st": l2, ...})``
runs the soup step (DESIGN section 1): Jacobian on the selected shared tensors, its compressed
exchange, the coordinator's solve, the weighted backward with the compressed update exchange
overlapped with it; ``engine.step()`` then steps DeepSpeed's optimizer.

How it plugs in. DeepSpeed has no comm-hook API. At ZeRO stage 0 its engine all-reduces the
module's ``.grad`` at the end of ``backward`` when ``enable_backward_allreduce`` is set (the seam
that its 1-bit optimizers use). The plugin builds DeepSpeed's engine as usual, turns that flag
off and gives the engine object a subclass of its own class (``isinstance`` checks still hold)
whose ``backward`` hands the losses to a :class:`~dist_soup.engine.SoupEngine` over
``engine.module``. One code path serves one and several objectives: with one objective the soup
engine has nothing to weigh and is compressed data parallelism. Everything after the backward
is DeepSpeed's own ``step``: gradient clipping (on the exchanged mean, identical on every
rank), the optimizer (its own, the config's, or bf16's master-weight wrapper), LR schedulers,
counters, ``no_sync``, checkpoints.

* ``gradient_accumulation_steps``: the micro-batches before the boundary accumulate locally
  (:meth:`SoupEngine.no_sync`); the boundary's backward exchanges the accumulated gradient once.
  Gradients are scaled by 1/gas like DeepSpeed's (the solvers and logs see the true losses).
* The forward does not register DeepSpeed's output-gradient hooks (they would scale the
  gradient a second time); it runs the module under DeepSpeed's autocast context.
* A non-finite loss or gradient on some rank (``nonfinite: skip``): no rank steps its optimizer
  or scheduler; DeepSpeed counts the step in ``skipped_steps`` as it does an fp16 overflow.
* ``save_checkpoint`` / ``load_checkpoint``: every rank writes its soup state (error-feedback
  residues, solver states, selection, step, and its torch RNG state) next to DeepSpeed's
  files, atomically (``<dir>/<tag>/dist_soup_rank<r>.pt``, read with
  ``torch.load(weights_only=True)``).

Supported: ZeRO stage 0, fp32 and bf16 (DeepSpeed's stage-0 bf16 wrapper steps fp32 master
weights from the exchanged bf16 gradients), on gloo (CPU) and NCCL. ZeRO 1 and 2 are refused
at initialize: their gradient reduction lives inside the ZeRO optimizer
(``stage_1_and_2.py``: ``reduce_gradients`` / ``average_tensor`` reduce-scatter the flat
``ipg`` buckets and fill ``averaged_gradients``), with no seam to hand it a reduced partition.
A compressed reduce-scatter (the first phase of ``two_phase`` gives each rank the mean of its
own chunk, what the partitioned optimizer needs) would have to replace that private method and
follow its bucket and partition boundaries, which change between releases; the soup step's
Jacobian reuse would have to write into the partition too. ZeRO 3 partitions the parameters
themselves and is refused. Also refused: fp16 loss scaling, 1-bit / 0-1 optimizers (they
communicate themselves), model/pipeline/sequence parallelism, DeepSpeed's reduction options
(``communication_data_type``, ``prescale_gradients``, ``gradient_predivide_factor``: the codec
decides what travels), ``managed_gradient_accumulation: false``.

Bad input (an unknown key, a codec the mode cannot carry, an unsupported stage or optimizer,
ranks whose configs differ) raises :class:`~dist_soup.config.ConfigError` on every rank before
DeepSpeed's engine is built: each rank checks its own input, then one all-gather of a fixed-size
uint8 record (status, config digests, message) lets every rank raise the same error.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from .. import config as config_mod
from ..config import ConfigError, DeepSpeedSection
from ..engine import SoupEngine, StepResult

__all__ = ["SECTION", "SUPPORTED_STAGES", "initialize", "stats", "load_config", "check_deepspeed_config"]

SECTION = "dist_soup"
SUPPORTED_STAGES = (0,)
#: The objective name when the section names none (``engine.backward(loss)``).
SINGLE_OBJECTIVE = "loss"
#: DeepSpeed optimizers that communicate themselves (compressed momentum); the plugin cannot drive them.
_SELF_COMMUNICATING = ("onebitadam", "zerooneadam", "onebitlamb")
_RANK_FILE = "dist_soup_rank{rank:05d}.pt"
_FORMAT = 1
_MESSAGE_BYTES = 1024


# --- config ------------------------------------------------------------------------------------
def load_config(config: Any) -> dict:
    """DeepSpeed's config as a fresh dict: a mapping (copied) or the path of a JSON file."""
    if isinstance(config, Mapping):
        return json.loads(json.dumps(config))
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            try:  # DeepSpeed itself reads its config files as hjson
                import hjson

                data = hjson.loads(text)
            except Exception:
                raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
        return json.loads(json.dumps(data))
    raise ConfigError(f"config: expected a dict or the path of a DeepSpeed JSON config, got {type(config).__name__}")


def _stage(ds: dict) -> int:
    zero = ds.get("zero_optimization", {})
    if zero is None:
        return 0
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization: expected a JSON object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"zero_optimization.stage: {stage!r} is not an integer")
    return stage


def _enabled(ds: dict, key: str) -> bool:
    section = ds.get(key)
    return isinstance(section, dict) and bool(section.get("enabled", False))


def check_deepspeed_config(ds: dict) -> None:
    """Refuse, with a clear ``ConfigError``, what the plugin cannot run (the module docstring)."""
    stage = _stage(ds)
    supported = ", ".join(str(s) for s in SUPPORTED_STAGES)
    if stage in (1, 2):
        raise ConfigError(
            f"zero_optimization.stage: {stage} is not supported by dist_soup's DeepSpeed plugin (supported: "
            f"stage {supported}); ZeRO 1/2 reduce gradients inside the ZeRO optimizer with no seam for a "
            "compressed reduce-scatter. Use stage 0, or plain DeepSpeed for ZeRO 1/2"
        )
    if stage == 3:
        raise ConfigError(
            f"zero_optimization.stage: 3 (partitioned parameters) is not supported by dist_soup's "
            f"DeepSpeed plugin (supported: stage {supported})"
        )
    if stage != 0:
        raise ConfigError(f"zero_optimization.stage: {stage!r} is not a ZeRO stage (supported: stage {supported})")
    for key, why in (
        ("fp16", "fp16 loss scaling is not supported; use bf16 or fp32"),
        ("amp", "apex amp is not supported; use bf16 or fp32"),
    ):
        if _enabled(ds, key):
            raise ConfigError(f"{key}.enabled: {why} with dist_soup's DeepSpeed plugin")
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        kind = str(opt.get("type", "")).lower()
        if kind in _SELF_COMMUNICATING:
            raise ConfigError(
                f"optimizer.type: {opt.get('type')!r} communicates compressed momentum itself, which "
                'dist_soup\'s plugin cannot drive; use Adam/AdamW ("torch_adam": true on CPU), SGD, '
                "Lamb, Lion, ... with a dist_soup codec instead"
            )
    for key, default in (
        ("communication_data_type", None),
        ("prescale_gradients", False),
        ("gradient_predivide_factor", 1.0),
    ):
        if key in ds and ds[key] != default:
            raise ConfigError(
                f"{key}: {ds[key]!r} shapes DeepSpeed's own all-reduce, which dist_soup replaces "
                f"(the codec in {SECTION}.compression decides what travels); leave it out"
            )
    if ds.get("managed_gradient_accumulation", True) is False:
        raise ConfigError(
            "managed_gradient_accumulation: false is not supported; dist_soup exchanges at "
            "DeepSpeed's accumulation boundary (gradient_accumulation_steps)"
        )
    compile_cfg = ds.get("compile")
    if isinstance(compile_cfg, dict) and compile_cfg.get("deepcompile"):
        raise ConfigError(
            "compile.deepcompile: DeepCompile reduces gradients in its compiled graph; not supported "
            "with dist_soup's plugin"
        )
    tp = ds.get("tensor_parallel")
    for key, size in (
        ("sequence_parallel_size", ds.get("sequence_parallel_size", 1)),
        ("tensor_parallel.autotp_size", tp.get("autotp_size", 1) if isinstance(tp, dict) else 1),
    ):
        if isinstance(size, int) and size > 1:
            raise ConfigError(f"{key}: {size}; dist_soup's plugin runs pure data parallelism (size 1 only)")


def _split(ds: dict) -> tuple[dict, Any]:
    section = ds.pop(SECTION, None)
    return ds, section


def _digest(obj: Any) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()[:8]


# --- agreement: every rank raises the same error before anything hangs ------------------------
def _agree(message: str | None, section_digest: bytes, config_digest: bytes) -> None:
    """One all-gather of (status, digests, message) bytes; raises on every rank alike."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        if message:
            raise ConfigError(message)
        return
    text = (message or "").encode("utf-8")[:_MESSAGE_BYTES]
    record = torch.zeros(1 + 16 + 2 + _MESSAGE_BYTES, dtype=torch.uint8)
    record[0] = 1 if message else 0
    record[1:9] = torch.frombuffer(bytearray(section_digest), dtype=torch.uint8)
    record[9:17] = torch.frombuffer(bytearray(config_digest), dtype=torch.uint8)
    record[17] = len(text) // 256
    record[18] = len(text) % 256
    if text:
        record[19 : 19 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    record = record.to(device)
    gathered = [torch.empty_like(record) for _ in range(world)]
    dist.all_gather(gathered, record)
    rows = [g.cpu() for g in gathered]
    rank = dist.get_rank()
    if message:
        raise ConfigError(message)
    for r, row in enumerate(rows):
        if row[0]:
            n = int(row[17]) * 256 + int(row[18])
            raise ConfigError(f"rank {r}: {bytes(row[19 : 19 + n].tolist()).decode('utf-8', errors='replace')}")
    mine = rows[rank]
    for r, row in enumerate(rows):
        if not torch.equal(row[1:9], mine[1:9]):
            raise ConfigError(
                f'the "{SECTION}" sections of ranks {rank} and {r} differ (digests '
                f"{bytes(mine[1:9].tolist()).hex()} and {bytes(row[1:9].tolist()).hex()}); start every "
                "rank with the same DeepSpeed config"
            )
        if not torch.equal(row[9:17], mine[9:17]):
            raise ConfigError(
                f"the DeepSpeed configs of ranks {rank} and {r} differ; start every rank with the same config"
            )


def _ensure_distributed(bound: inspect.BoundArguments) -> None:
    if dist.is_initialized():
        return
    import deepspeed

    backend = os.environ.get("DIST_SOUP_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs = {"dist_backend": backend}
    for key in ("distributed_port", "dist_init_required"):
        if key in bound.arguments:
            kwargs[key] = bound.arguments[key]
    deepspeed.init_distributed(**kwargs)


# --- the engine ----------------------------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale``: DeepSpeed's 1/gas scaling without changing the
    loss values that the solvers and the logs see."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class _SoupEngineMixin:
    """Put in front of DeepSpeed's engine class: backward through the soup engine."""

    soup: SoupEngine
    soup_result: StepResult | None
    # What the mixin uses of the DeepSpeed engine it is put in front of (annotations only).
    optimizer: Any
    inside_no_sync_ctxt: bool
    engine_timers: Any
    gradient_accumulation_steps: Callable[[], int]
    gradient_clipping: Callable[[], float]
    module: torch.nn.Module
    is_gradient_accumulation_boundary: Callable[[], bool]
    _start_timers: Callable[[Any], None]
    _stop_timers: Callable[[Any], None]

    def forward(self, *inputs, **kwargs):
        """The module's forward under DeepSpeed's autocast context (when configured), without
        DeepSpeed's output hooks: they would scale the gradients by 1/gas a second time."""
        try:
            from deepspeed.runtime.torch_autocast import autocast_if_enabled
        except ImportError:  # older DeepSpeed: no torch autocast support
            autocast_if_enabled = None
        with autocast_if_enabled(self) if autocast_if_enabled is not None else contextlib.nullcontext():
            return self.module(*inputs, **kwargs)

    def _soup_losses(self, loss) -> dict[str, torch.Tensor]:
        names = self.soup.objectives
        if isinstance(loss, Mapping):
            return dict(loss)
        if isinstance(loss, torch.Tensor):
            if len(names) > 1:
                raise ValueError(
                    f"backward: this engine trains {len(names)} objectives {list(names)}; pass "
                    "engine.backward({name: loss, ...})"
                )
            return {names[0]: loss}
        raise TypeError(f"backward: expected a loss tensor or a dict name -> loss, got {type(loss).__name__}")

    def backward(self, loss, retain_graph: bool = False, scale_wrt_gas: bool = True, *, epoch: float | None = None):
        """DeepSpeed's backward through the soup step. ``loss``: a scalar tensor (one objective)
        or a dict objective -> scalar tensor. Returns the losses scaled by 1/gas, like DeepSpeed.
        ``epoch``: the epoch of the penalty schedules (default: steps / ``steps_per_epoch``)."""
        if retain_graph:
            raise ValueError("backward(retain_graph=True) is not supported by dist_soup's plugin")
        if self.optimizer is None:
            raise ValueError("backward: this engine has no optimizer; pass one to initialize or in the config")
        losses = self._soup_losses(loss)
        gas = self.gradient_accumulation_steps()
        scale = 1.0 / gas if scale_wrt_gas else 1.0
        feed = {
            k: _ScaleGrad.apply(v, scale) if scale != 1.0 and isinstance(v, torch.Tensor) else v
            for k, v in losses.items()
        }
        local = self.inside_no_sync_ctxt or not self.is_gradient_accumulation_boundary()
        self._start_timers(self.engine_timers.backward_timers)
        try:
            if local:
                with self.soup.no_sync():
                    result = self.soup.backward(feed, epoch=epoch)
            else:
                result = self.soup.backward(feed, epoch=epoch)
                self._soup_exchanged = True
                self._soup_skip = result.skipped
        finally:
            self._stop_timers(self.engine_timers.backward_timers)
        self.soup_result = result
        if isinstance(loss, Mapping):
            return {k: v * scale for k, v in loss.items()}
        return loss * scale

    def clip_fp32_gradients(self):
        """DeepSpeed's fp32 gradient clipping, without its collective: after the exchange every
        rank holds the same mean, so its local norm is the global one. (DeepSpeed all-reduces
        the norm for MoE experts, whose gradients differ between ranks; those keep its path.)"""
        if getattr(self, "has_moe_layers", False):
            return super().clip_fp32_gradients()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.gradient_clipping())

    def step(self, lr_kwargs=None):
        boundary = self.is_gradient_accumulation_boundary() and not self.inside_no_sync_ctxt
        if boundary and not self._soup_exchanged:
            if any(p.grad is not None for _, p in self.soup.params):
                raise RuntimeError(
                    "step(): the gradients did not go through engine.backward(loss), so they were "
                    "never averaged over the ranks; call engine.backward(loss) (not loss.backward())"
                )
        if boundary:
            self._soup_exchanged = False
        if boundary and self._soup_skip:
            self._soup_skip = False
            with _skipped_update(self):
                return super().step(lr_kwargs)
        return super().step(lr_kwargs)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        """DeepSpeed's checkpoint plus every rank's soup state, written before DeepSpeed's
        ``latest`` so that a checkpoint ``latest`` names always holds it."""
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        path = Path(save_dir) / tag / _RANK_FILE.format(rank=self.soup.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_save(
            {
                "format": _FORMAT,
                "rank": self.soup.rank,
                "world_size": self.soup.world_size,
                "objectives": list(self.soup.objectives),
                "soup": self.soup.state_dict(),
                "skip": bool(self._soup_skip),
                "rng": _rng_state(),
            },
            path,
        )
        dist.barrier()
        return super().save_checkpoint(
            save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest, **kwargs
        )

    def load_checkpoint(self, load_dir, tag=None, *args, **kwargs):
        """DeepSpeed's load, then this rank's soup state from the same checkpoint."""
        module_only = kwargs.get("load_module_only", False)
        if tag is None:
            latest = Path(load_dir) / "latest"
            if latest.is_file():
                tag = latest.read_text().strip()
        state, message = None, None
        if tag is not None and not module_only:
            path = Path(load_dir) / str(tag) / _RANK_FILE.format(rank=self.soup.rank)
            try:
                state = ckpt.load(path)
                if not isinstance(state, dict) or state.get("format") != _FORMAT:
                    raise ValueError(f"checkpoint file {str(path)!r} is not a dist_soup plugin checkpoint")
                if state.get("world_size") != self.soup.world_size:
                    raise ValueError(
                        f"checkpoint {str(path.parent)!r} was saved by {state.get('world_size')} ranks, "
                        f"this run has {self.soup.world_size}"
                    )
                if state.get("objectives") != list(self.soup.objectives):
                    raise ValueError(
                        f"checkpoint {str(path.parent)!r} trained objectives {state.get('objectives')}, "
                        f"this engine {list(self.soup.objectives)}"
                    )
            except ValueError as exc:
                message = str(exc)
        _agree(message, b"\0" * 8, b"\0" * 8)
        load_path, client_state = super().load_checkpoint(load_dir, tag, *args, **kwargs)
        if load_path is not None and state is not None:
            self.soup.load_state_dict(state["soup"])
            self._soup_skip = bool(state.get("skip", False))
            self._soup_exchanged = False
            _set_rng_state(state.get("rng") or {})
        return load_path, client_state

    def destroy(self):
        try:
            self.soup.reducer.remove()
        finally:
            super().destroy()


def _rng_state() -> dict:
    """This rank's torch generators (CPU, and the current CUDA device's when initialised):
    resume is exact also for models that draw random numbers (dropout)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _skipped_update(engine):
    """DeepSpeed's step with no update: the optimizer reports an overflow, as fp16 does, so the
    engine counts a skipped step and leaves the scheduler alone. Zero gradients keep clipping's
    norm (an all-reduce) well defined on every rank."""
    for p in engine.module.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    opt = engine.optimizer
    had = "overflow" in vars(opt)
    old = vars(opt).get("overflow")

    def no_update(*_args, **_kwargs):
        opt.overflow = True
        return True

    opt.step = no_update
    try:
        yield
    finally:
        del opt.step
        if had:
            opt.overflow = old
        else:
            vars(opt).pop("overflow", None)


_CLASSES: dict[type, type] = {}


def _soup_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"DistSoup{cls.__name__}", (_SoupEngineMixin, cls), {"__doc__": cls.__doc__})
    return _CLASSES[cls]


def _check_model(model, section: DeepSpeedSection, client_optimizer, bound) -> None:
    if model is None:
        raise ConfigError("initialize: model is required")
    if bound.arguments.get("mpu") is not None:
        raise ConfigError("mpu: model parallelism is not supported by dist_soup's plugin (pure data parallelism)")
    try:
        from deepspeed.pipe import PipelineModule

        if isinstance(model, PipelineModule):
            raise ConfigError("model: pipeline parallelism (PipelineModule) is not supported by dist_soup's plugin")
    except ImportError:
        pass
    if section.shared is not None:
        try:
            trunk = model.get_submodule(section.shared)
        except AttributeError:
            raise ConfigError(f"{SECTION}.shared: the model has no submodule {section.shared!r}") from None
        if not any(p.requires_grad for p in trunk.parameters()):
            raise ConfigError(f"{SECTION}.shared: submodule {section.shared!r} has no trainable parameters")
    if client_optimizer is not None and not callable(client_optimizer):
        name = type(client_optimizer).__name__.lower()
        if any(k in name for k in _SELF_COMMUNICATING):
            raise ConfigError(
                f"optimizer: {type(client_optimizer).__name__} communicates itself; dist_soup's plugin cannot drive it"
            )


def _recipe(section: DeepSpeedSection, objectives: tuple[str, ...]):
    from ..builders import recipe_from_sections

    groups = {g: tuple(m) for g, m in (section.groups or {}).items()}
    try:
        return recipe_from_sections(section.recipe, section.solver, objectives, groups)
    except ValueError as exc:
        raise ConfigError(f"{SECTION}.recipe: {exc}") from None


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with dist_soup's exchange (and soup step) in the engine.

    Takes exactly ``deepspeed.initialize``'s arguments and returns the same tuple
    ``(engine, optimizer, dataloader, lr_scheduler)``; ``config`` (or ``config_params``, or
    ``args.deepspeed_config``) may hold a ``"dist_soup"`` section (module docstring).
    """
    import deepspeed

    bound = inspect.signature(deepspeed.initialize).bind(*args, **kwargs)
    given = dict(bound.arguments)
    ds_args = given.get("args")
    source = given.pop("config", None)
    alias = given.pop("config_params", None)
    if source is not None and alias is not None:
        raise ConfigError("initialize: pass the DeepSpeed config once (config or config_params)")
    source = source if source is not None else alias
    from_args = getattr(ds_args, "deepspeed_config", None) if ds_args is not None else None
    if source is None and from_args is not None:
        source = from_args
        ds_args = copy.copy(ds_args)
        ds_args.deepspeed_config = None  # handed to DeepSpeed as config= below, without the section
        given["args"] = ds_args
    if source is None:
        raise ConfigError("initialize: a DeepSpeed config is required (config=dict or path)")

    _ensure_distributed(bound)
    message, section, objectives, recipe = None, DeepSpeedSection(), (SINGLE_OBJECTIVE,), None
    ds_config: dict = {}
    try:
        ds_config, raw = _split(load_config(source))
        section = config_mod.deepspeed_section(raw)
        check_deepspeed_config(ds_config)
        objectives = tuple(section.objectives or (SINGLE_OBJECTIVE,))
        _check_model(given.get("model"), section, given.get("optimizer"), bound)
        recipe = _recipe(section, objectives)
    except (ConfigError, ValueError, TypeError) as exc:
        message = str(exc)
    _agree(
        message, _digest(config_mod.to_dict(section) if dataclasses.is_dataclass(section) else {}), _digest(ds_config)
    )

    engine, optimizer, dataloader, scheduler = deepspeed.initialize(**given, config=ds_config)
    if engine.zero_optimization_stage() not in SUPPORTED_STAGES:  # e.g. set by a DeepSpeed default
        raise ConfigError(f"zero_optimization.stage: {engine.zero_optimization_stage()} is not supported")
    if engine.dp_world_size != dist.get_world_size():
        raise ConfigError("dist_soup's plugin runs pure data parallelism: the data-parallel group must be the world")
    steps_per_epoch = section.steps_per_epoch
    if steps_per_epoch is None:
        gas = engine.gradient_accumulation_steps()
        steps_per_epoch = max(1, len(dataloader) // gas) if dataloader is not None else 1
    recipe.set_run_length(steps_per_epoch=steps_per_epoch)  # for eta schedules in steps
    soup = SoupEngine(
        engine.module,
        None,
        objectives,
        section.shared,
        recipe,
        steps_per_epoch=steps_per_epoch,
        transport="torch",
        **config_mod.engine_options(section.as_config()),
    )
    engine.__class__ = _soup_class(type(engine))
    engine.enable_backward_allreduce = False  # the soup engine averages the gradients
    engine.soup = soup
    engine.soup_section = section
    engine.soup_result = None
    engine._soup_skip = False
    engine._soup_exchanged = False
    return engine, optimizer, dataloader, scheduler


# --- statistics ------------------------------------------------------------------------------
def _soup_of(engine) -> SoupEngine:
    soup = getattr(engine, "soup", None)
    if not isinstance(soup, SoupEngine):
        raise TypeError("stats: not an engine built by dist_soup.integrations.deepspeed.initialize")
    return soup


def stats(engine) -> dict:
    """This rank's exchange statistics since initialize: totals over the update and Jacobian
    exchanges (``bytes_sent``, ``bytes_received``, ``overhead_bytes``, ``dense_bytes`` what fp32
    would have sent, ``encode_s``, ``comm_s``, ``decode_s``, ``calls``, ``collectives``), the
    ``ratio`` dense/sent, each exchange on its own (``update``, ``jacobian``), ``exchanges``
    (exchanging backwards: one per optimizer step) and ``skipped_steps``."""
    soup = _soup_of(engine)
    u, j = soup.u_exchange.stats.as_dict(), soup.j_exchange.stats.as_dict()
    total: dict[str, Any] = {k: u[k] + j[k] for k in u}
    total["ratio"] = total["dense_bytes"] / total["bytes_sent"] if total["bytes_sent"] else None
    total.update(update=u, jacobian=j, exchanges=soup.step_count, skipped_steps=soup.skipped_steps)
    return total
