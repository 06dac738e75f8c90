"""The training configuration: typed dataclasses, YAML loading, ``--set`` overrides, validation.

Every key is checked: an unknown key, a value of the wrong type or outside what is allowed is a
``ConfigError`` naming the dotted key, the bad value and what is allowed. Nothing is silently
ignored. ``fingerprint`` gives a stable digest that the ranks of a run compare.

Codec names and options are checked here too, against the codecs' own constructors (see
``dist_soup.compress.registry.option_names``), so a bad option fails before any process starts.

``--set`` overrides follow what they change: when an override changes a section's ``name``
(``task``, ``solver``, ``compression.jacobian``, ``compression.update``), the file's ``options``
of that section belonged to the old name and are dropped (with a note); when it changes
``recipe.kind``, the file's recipe keys that the new kind does not use are dropped (with a note).
Keys the overrides set themselves are kept and checked like any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value that is missing, unknown or not allowed."""


@dataclass
class TaskConfig:
    name: str = "msp_synth"
    #: Passed to ``dist_soup.tasks.build(name, **options)`` (data and model sizes).
    options: dict = field(default_factory=dict)
    #: Train on these objectives only (default: all of the task's). One objective gives a
    #: single-task baseline run.
    objectives: list | None = None


@dataclass
class EtaConfig:
    """Penalty schedule of the later levels (``dist_soup.moo.recipe.Schedule``):
    eta(t) = min(cap, start + step * t), or with ``every``: min(cap, start + step * floor(t / every))."""

    start: float = 0.1
    step: float = 0.02
    cap: float | None = 1.5
    #: What t counts: epochs (fractional, step / steps per epoch), steps (optimizer steps done)
    #: or fraction (steps done / train.steps: 0 at the start, about 1 at the end).
    unit: Literal["epochs", "steps", "fraction"] = "epochs"
    #: null: eta grows by ``step`` per unit, linearly; N: by ``step`` every N units (stairs;
    #: a whole number with unit steps, at most 1 with unit fraction).
    every: float | None = None


@dataclass
class RecipeConfig:
    #: vs (one level), vc (MOO level + penalty level), vm (ordered MOO levels), custom (levels).
    kind: Literal["vs", "vc", "vm", "custom"] = "vs"
    #: vm only: the task's groups, one level each, first level first (e.g. [asr, st, ssl]), or
    #: the name of one of the task's orders (msp_synth: "uas" = asr, st, ssl; "usa" = st, asr,
    #: ssl); null: the task's first order.
    order: str | list | None = None
    #: vc only: the group that becomes the penalty level; null: the task's (msp_synth: ssl).
    constraint: str | None = None
    eta: EtaConfig = field(default_factory=EtaConfig)
    #: custom only: a list of {objectives: [...], solver: name, solver_options: {}, eta: {...},
    #: penalty: bool}.
    levels: list | None = None


@dataclass
class SolverConfig:
    name: str = "mgda"
    options: dict = field(default_factory=dict)


@dataclass
class SelectionConfig:
    rule: Literal["threshold", "top_m", "budget", "all"] = "all"
    tau: float = 0.0
    m: int | None = None
    budget: int | None = None
    probe_every: int = 100


@dataclass
class CodecConfig:
    #: A codec of ``dist_soup.compress`` (identity, fp16, bf16, qsgd, adacomp, topk, randomk, cltk).
    name: str = "qsgd"
    #: Keyword options of that codec's constructor, plus ``error_feedback``. When absent, the
    #: default codec's default ``{bits: 4}``, or ``{}`` when another codec is named.
    options: dict = field(default_factory=lambda: {"bits": 4})


@dataclass
class CompressionConfig:
    jacobian: CodecConfig = field(default_factory=CodecConfig)
    update: CodecConfig = field(default_factory=CodecConfig)
    mode: Literal["allgather", "allreduce", "two_phase"] = "allgather"
    bucket_mb: float = 25.0
    #: The update's buckets that leave during the backward close once they hold this much
    #: (smaller: earlier overlap, more calls, each about 0.3 ms of CPU).
    overlap_mb: float = 4.0


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    #: Learning-rate schedule over train.steps: constant, cosine or linear decay to 0.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    #: Linear warm-up from 0 over this many steps, before the schedule.
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    steps: int = 200
    #: Examples per rank per step.
    batch_size: int = 32
    #: Solve the weighting every this many steps; reuse lambda in between.
    solve_every: int = 25
    gram: Literal["auto", "cross", "plain"] = "auto"
    #: What to do with a non-finite loss or gradient: skip the step (counted) or raise.
    nonfinite: Literal["skip", "raise"] = "skip"
    #: Rows of the selected tensors reuse the exchanged Jacobian (Jbar^T w) in the update.
    reuse_jacobian: bool = True
    #: Seconds a collective or the rendezvous store may wait for a peer before every rank gives
    #: up (a dead host, a link down): the torch.distributed process group's timeout.
    timeout_s: float = 180.0
    #: soup: the dist_soup engine (the recipe, solver, selection and compression sections);
    #: ddp: the torch DDP baseline on the sum of the losses (the ``ddp`` section; those four
    #: sections are then not used), for comparisons on the same task, data and optimizer.
    engine: Literal["soup", "ddp"] = "soup"


@dataclass
class DDPConfig:
    """``train.engine: ddp``: torch ``DistributedDataParallel`` with one of torch's own comm hooks
    (``dist_soup.ddp_baseline``)."""

    #: none: DDP's own fp32 all-reduce; fp16: ``fp16_compress_hook``; powersgd: ``powerSGD_hook``.
    hook: Literal["none", "fp16", "powersgd"] = "none"
    #: powersgd only: ``matrix_approximation_rank``.
    powersgd_rank: int = 1
    #: powersgd only: ``start_powerSGD_iter``, the plain all-reduce steps before compression
    #: (torch needs >= 2 with its error feedback and warm start, which are on).
    powersgd_start: int = 2
    #: DDP's ``bucket_cap_mb``. With powersgd on gloo use one bucket (a size above the model's):
    #: torch's hook issues all-reduces from future callbacks that can race the next bucket's
    #: (pytorch/pytorch#58467: a size-mismatch abort or a hang).
    bucket_mb: float = 25.0


@dataclass
class CheckpointConfig:
    #: Save every this many steps (0: only at the end).
    every: int = 50
    #: Keep this many most recent checkpoints.
    keep: int = 2


@dataclass
class LoggingConfig:
    every: int = 10
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    #: Evaluate task metrics every this many steps (0: only at the end).
    eval_every: int = 0


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0


_POSITIVE = {
    "train.steps",
    "train.batch_size",
    "train.solve_every",
    "selection.probe_every",
    "logging.every",
    "checkpoint.keep",
    "optimizer.lr",
    "compression.bucket_mb",
    "compression.overlap_mb",
    "train.timeout_s",
    "ddp.powersgd_rank",
    "ddp.bucket_mb",
}
_NON_NEGATIVE = {
    "checkpoint.every",
    "logging.eval_every",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "optimizer.warmup_steps",
}
#: Recipe keys that only some kinds use (anything but null is refused with another kind).
_RECIPE_KEY_KINDS: dict[str, tuple[str, ...]] = {"order": ("vm",), "constraint": ("vc",), "levels": ("custom",)}
#: Sections whose ``options`` belong to their ``name``.
_OPTIONS_FOLLOW_NAME = ("task", "solver", "compression.jacobian", "compression.update")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; use {_describe(tp)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        return dict(value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return list(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], key)
    if cls is CodecConfig and "options" not in data and kwargs.get("name", CodecConfig.name) != CodecConfig.name:
        kwargs["options"] = {}  # the default options are the default codec's
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> None:
    flat = to_dict(cfg)

    def get(key: str) -> Any:
        node: Any = flat
        for part in key.split("."):
            node = node[part]
        return node

    for key in _POSITIVE:
        if get(key) <= 0:
            raise ConfigError(f"{key}: {get(key)!r} must be > 0")
    for key in _NON_NEGATIVE:
        if get(key) < 0:
            raise ConfigError(f"{key}: {get(key)!r} must be >= 0")
    if cfg.recipe.kind == "custom" and not cfg.recipe.levels:
        raise ConfigError("recipe.levels: a custom recipe needs a non-empty list of levels")
    for key, kinds in _RECIPE_KEY_KINDS.items():
        value = getattr(cfg.recipe, key)
        if value is not None and cfg.recipe.kind not in kinds:
            raise ConfigError(
                f"recipe.{key}: {_short(value)} is only used with recipe.kind {' or '.join(kinds)} "
                f"(kind is {cfg.recipe.kind!r})"
            )
    _check_recipe(cfg)
    _check_ddp(cfg)
    if cfg.selection.rule == "top_m" and (cfg.selection.m is None or cfg.selection.m <= 0):
        raise ConfigError("selection.m: rule top_m needs a positive integer m")
    if cfg.selection.rule == "budget" and (cfg.selection.budget is None or cfg.selection.budget <= 0):
        raise ConfigError("selection.budget: rule budget needs a positive parameter count")


def _check_recipe(cfg: Config) -> None:
    """The penalty schedule, the custom levels and the solver's name and options, built as the
    run will build them, so that a bad value fails before any process starts."""
    from .moo import solvers
    from .moo.recipe import Recipe, Schedule

    eta = cfg.recipe.eta
    for key in ("start", "cap"):  # a negative weight would ascend its objectives
        if getattr(eta, key) is not None and getattr(eta, key) < 0:
            raise ConfigError(f"recipe.eta.{key}: {getattr(eta, key)!r} must be >= 0")
    if eta.every is not None:
        if eta.every <= 0:
            raise ConfigError(f"recipe.eta.every: {eta.every!r} must be > 0 (units per stair) or null (linear)")
        if eta.unit == "steps" and eta.every != int(eta.every):
            raise ConfigError(
                f"recipe.eta.every: {eta.every!r} must be a whole number of steps with recipe.eta.unit steps"
            )
        if eta.unit == "fraction" and eta.every > 1:
            raise ConfigError(
                f"recipe.eta.every: {eta.every!r} must be in (0, 1] with recipe.eta.unit fraction "
                "(a stair longer than the run is never climbed)"
            )
    try:
        Schedule.from_spec(vars(eta))
    except ValueError as exc:
        raise ConfigError(f"recipe.eta: {exc}") from None
    if cfg.recipe.kind == "custom" and cfg.recipe.levels:
        try:
            Recipe.from_levels(cfg.recipe.levels)
        except ValueError as exc:
            raise ConfigError(f"recipe.levels: {exc}") from None
    _check_order(cfg)
    s = cfg.solver
    if s.name not in solvers.names():
        raise ConfigError(f"solver.name: {s.name!r} is not a solver; use one of {', '.join(solvers.names())}")
    allowed = solvers.option_names(s.name)
    for opt in s.options:
        if opt not in allowed:
            raise ConfigError(
                f"solver.options.{opt}: solver {s.name!r} has no option {opt!r}; "
                f"its options: {', '.join(allowed) if allowed else 'none'}"
            )
    try:
        solvers.build(s.name, **s.options)
    except ValueError as exc:
        raise ConfigError(f"solver.options: {_short(s.options)} not allowed for solver {s.name!r}: {exc}") from None


def _check_order(cfg: Config) -> None:
    """``recipe.order``: a list of group names, or the name of one of the task's orders."""
    order = cfg.recipe.order
    if isinstance(order, list):
        if not order or not all(isinstance(g, str) and g for g in order) or len(set(order)) != len(order):
            raise ConfigError(f"recipe.order: {_short(order)} must be a non-empty list of distinct group names")
        return
    if order is None:
        return
    from . import tasks

    try:
        orders = tasks.task_class(cfg.task.name).level_orders
    except ValueError:  # an unknown task fails where it is built, with its own message
        return
    if order not in orders:
        named = f"one of {', '.join(map(repr, orders))} or " if orders else ""
        raise ConfigError(
            f"recipe.order: {order!r} is not an order of task {cfg.task.name!r}; use {named}a list "
            "of its groups, first level first"
        )


def _check_ddp(cfg: Config) -> None:
    """The ``ddp`` section is only used by ``train.engine: ddp``, its PowerSGD keys only by that
    hook: a key set where it has no effect is refused rather than ignored."""
    d, default = cfg.ddp, DDPConfig()
    if cfg.train.engine != "ddp":
        for key in ("hook", "powersgd_rank", "powersgd_start", "bucket_mb"):
            if getattr(d, key) != getattr(default, key):
                raise ConfigError(
                    f"ddp.{key}: {_short(getattr(d, key))} is only used with train.engine 'ddp' "
                    f"(engine is {cfg.train.engine!r})"
                )
        return
    if d.hook != "powersgd":
        for key in ("powersgd_rank", "powersgd_start"):
            if getattr(d, key) != getattr(default, key):
                raise ConfigError(
                    f"ddp.{key}: {getattr(d, key)!r} is only used with ddp.hook 'powersgd' (hook is {d.hook!r})"
                )
    if d.powersgd_start < 2:
        raise ConfigError(
            f"ddp.powersgd_start: {d.powersgd_start!r} must be >= 2 (torch's PowerSGD needs a plain "
            "all-reduce step before its error feedback and warm start begin)"
        )


def _short(value: Any, limit: int = 60, quote: bool = True) -> str:
    """A value in one short line: YAML flow style, strings quoted unless ``quote`` is false
    (as after ``--set key=``)."""
    if quote and isinstance(value, str):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_codecs(cfg: Config) -> None:
    """Each codec's name and options, by building one stream as the exchange will (less the
    seed, rank and stream it gives each one)."""
    from .compress import LinearCodec, registry  # importing the package registers every codec

    for part in ("jacobian", "update"):
        c, key = getattr(cfg.compression, part), f"compression.{part}"
        if c.name not in registry.names():
            raise ConfigError(f"{key}.name: {c.name!r} is not a codec; use one of {', '.join(registry.names())}")
        allowed = registry.option_names(c.name)
        for opt in c.options:
            if opt not in allowed:
                raise ConfigError(
                    f"{key}.options.{opt}: codec {c.name!r} has no option {opt!r}; its options: {', '.join(allowed)}"
                )
        try:
            probe = registry.build(c.name, **c.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}.options: {_short(c.options)} not allowed for codec {c.name!r}: {exc}") from None
        if cfg.compression.mode == "allreduce" and not isinstance(probe, LinearCodec):
            raise ConfigError(
                f"compression.mode: 'allreduce' sums encodings on the wire, which {key}.name "
                f"{c.name!r} cannot; use 'allgather' or 'two_phase' with it"
            )


def from_dict(data: Any) -> Config:
    cfg = _build(Config, data)
    _check_ranges(cfg)
    _check_codecs(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def load(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), on_note: Callable[[str], None] | None = None
) -> Config:
    """Read a YAML config file and apply ``key=value`` overrides (values parsed as YAML).

    ``on_note`` receives one line per file key an override made stale (see the module
    docstring); by default it goes to stderr."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return from_dict(apply_overrides(data, overrides, on_note))


def _note_to_stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def apply_overrides(
    data: dict, overrides: list[str] | tuple[str, ...], on_note: Callable[[str], None] | None = None
) -> dict:
    """``a.b=c`` sets data["a"]["b"] = yaml(c); the result is validated by ``from_dict``.

    An override that changes a section's ``name`` or ``recipe.kind`` drops the file's keys that
    belonged to the old one (not those that overrides set), telling ``on_note`` in one line."""
    original = data
    data = json.loads(json.dumps(data))  # deep copy of plain data
    explicit: set[str] = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key segment")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
        explicit.add(".".join(parts))
    _drop_stale(original, data, explicit, on_note or _note_to_stderr)
    return data


_MISSING = object()


def _get(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _default(key: str) -> Any:
    node: Any = Config()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _drop_stale(original: dict, data: dict, explicit: set[str], note: Callable[[str], None]) -> None:
    """Drop from ``data`` the file's keys that an override of a name or recipe kind made stale."""

    def covered(key: str) -> bool:  # set by an override, itself or within a section it set
        parts = key.split(".")
        return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))

    def old_and_new(key: str) -> tuple[Any, Any] | None:  # when an override changed key
        if not covered(key):
            return None
        old, new = _get(original, key), _get(data, key)
        old = _default(key) if old is _MISSING else old
        return None if new == old else (old, new)

    for section in _OPTIONS_FOLLOW_NAME:
        change, options = old_and_new(f"{section}.name"), _get(data, f"{section}.options")
        if change is None or not isinstance(options, dict):
            continue
        stale = {k: v for k, v in options.items() if not covered(f"{section}.options.{k}")}
        if stale:
            _get(data, section)["options"] = {k: v for k, v in options.items() if k not in stale}
            note(
                f"--set {section}.name={_short(change[1], quote=False)} drops the file's {section}.options "
                f"{_short(stale)} (given for {_short(change[0])})"
            )
    change, recipe = old_and_new("recipe.kind"), _get(data, "recipe")
    if change is not None and isinstance(recipe, dict):
        for key, kinds in _RECIPE_KEY_KINDS.items():
            if recipe.get(key) is not None and change[1] not in kinds and not covered(f"recipe.{key}"):
                note(
                    f"--set recipe.kind={_short(change[1], quote=False)} drops the file's recipe.{key}: "
                    f"{_short(recipe.pop(key))} (only used with recipe.kind {' or '.join(kinds)})"
                )


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


#: Bump when a default of this schema changes what a run does: the fingerprint hashes only the
#: values that differ from the defaults, so an old config would otherwise keep its fingerprint
#: and mean something else (a resume or a finished sweep cell would be taken for the new one).
DEFAULTS_VERSION = 1


def fingerprint(cfg: Config) -> str:
    """sha256 of the canonical JSON of the resolved config's values that differ from the
    defaults, and of :data:`DEFAULTS_VERSION`: a key added to the schema later, at a default that
    keeps the old behaviour, leaves every earlier config's fingerprint (and so resumes and
    finished sweep cells) as it was; a changed default bumps the version and changes them all."""
    blob = {"defaults": DEFAULTS_VERSION, "changed": _changed(cfg, Config())}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _changed(obj: Any, default: Any) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value, base = getattr(obj, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            sub = _changed(value, base)
            if sub:
                out[f.name] = sub
        elif value != base:  # options mappings and lists compare whole
            out[f.name] = value
    return out


# --- the "dist_soup" section of a DeepSpeed config (dist_soup.integrations.deepspeed) ---------
@dataclass
class DeepSpeedSection:
    """The ``"dist_soup"`` section of a DeepSpeed JSON config: this config's keys in one level
    (``compression``, ``recipe``, ``solver``, ``selection`` as here; ``solve_every``, ``gram``,
    ``nonfinite``, ``reuse_jacobian`` as in ``train``), checked by the same code."""

    compression: CompressionConfig = field(default_factory=CompressionConfig)
    #: Objective names in the order of the Jacobian rows; null: one objective (``loss``).
    objectives: list | None = None
    #: Dotted name of the model's shared trunk submodule; needed with several objectives.
    shared: str | None = None
    #: Recipe groups for kinds vc and vm, e.g. {asr: [asr_0, asr_1], st: [st], ssl: [ssl]}.
    groups: dict | None = None
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    solve_every: int = 25
    gram: Literal["auto", "cross", "plain"] = "auto"
    nonfinite: Literal["skip", "raise"] = "skip"
    reuse_jacobian: bool = True
    #: Seeds the codecs' stochastic rounding (with rank, step and stream).
    seed: int = 0

    #: Optimizer steps per epoch of the penalty schedules (eta); null: from the DeepSpeed
    #: dataloader when ``training_data`` is given, else 1 (or pass ``epoch=`` to backward).
    steps_per_epoch: int | None = None

    def as_config(self) -> Config:
        """This section as a project config (its ``train`` keys in ``train``)."""
        return Config(
            recipe=self.recipe,
            solver=self.solver,
            selection=self.selection,
            compression=self.compression,
            seed=self.seed,
            train=TrainConfig(
                solve_every=self.solve_every,
                gram=self.gram,
                nonfinite=self.nonfinite,
                reuse_jacobian=self.reuse_jacobian,
            ),
        )


def engine_options(cfg: Config) -> dict:
    """The keyword arguments of ``SoupEngine`` that the config sets (the compression, the
    selection, the solve cadence); the caller adds the model, optimizer, objectives, trunk,
    recipe, ``steps_per_epoch`` and transport. One place, so that the CLI, the DeepSpeed plugin
    and the benchmarks build the same engine from the same config."""
    c = cfg.compression
    return dict(
        gram=cfg.train.gram,
        selection={k: v for k, v in vars(cfg.selection).items() if k != "probe_every"},
        probe_every=cfg.selection.probe_every,
        solve_every=cfg.train.solve_every,
        jacobian_compressor=c.jacobian.name,
        jacobian_options=c.jacobian.options,
        update_compressor=c.update.name,
        update_options=c.update.options,
        mode=c.mode,
        bucket_mb=c.bucket_mb,
        overlap_mb=c.overlap_mb,
        reuse_jacobian=cfg.train.reuse_jacobian,
        nonfinite=cfg.train.nonfinite,
        seed=cfg.seed,
    )


def deepspeed_section(data: Any) -> DeepSpeedSection:
    """The checked ``"dist_soup"`` section; a ``ConfigError`` names the key as ``dist_soup.KEY``."""
    sec = _build(DeepSpeedSection, data, "dist_soup")
    r = sec.recipe
    if r.kind == "vm" and not isinstance(r.order, list):
        # No task here to name an order: the groups are the section's own.
        raise ConfigError(
            f"dist_soup.recipe.order: {_short(r.order)}: recipe vm needs the names of "
            "dist_soup.groups as a list, one level each, first level first (e.g. [asr, st, ssl])"
        )
    if r.kind == "vc" and r.constraint is None:
        raise ConfigError(
            "dist_soup.recipe.constraint: recipe vc needs the name of the group of dist_soup.groups "
            "that becomes the penalty level (e.g. ssl)"
        )
    try:
        _check_ranges(sec.as_config())
        _check_codecs(sec.as_config())
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            "dist_soup." + (message[len("train.") :] if message.startswith("train.") else message)
        ) from None
    if sec.steps_per_epoch is not None and sec.steps_per_epoch < 1:
        raise ConfigError(f"dist_soup.steps_per_epoch: {sec.steps_per_epoch!r} must be > 0")
    fraction = ["recipe.eta"] if sec.recipe.eta.unit == "fraction" and sec.recipe.kind in ("vc", "vm") else []
    for j, level in enumerate((sec.recipe.levels or []) if sec.recipe.kind == "custom" else []):
        if isinstance(level.get("eta"), dict) and level["eta"].get("unit") == "fraction":
            fraction.append(f"recipe.levels[{j}].eta")
    if fraction:
        # The section carries no run length (DeepSpeed leaves the number of steps to the script).
        raise ConfigError(
            f"dist_soup.{fraction[0]}.unit: 'fraction' needs the run's number of steps, which a "
            "DeepSpeed config does not give; use 'steps' or 'epochs'"
        )
    names = sec.objectives
    if names is not None:
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"dist_soup.objectives: {_short(names)} must be a non-empty list of distinct names")
        if len(names) > 1 and not sec.shared:
            raise ConfigError(
                "dist_soup.shared: several objectives need the name of the model's shared trunk "
                'submodule (e.g. "encoder")'
            )
    for group, members in (sec.groups or {}).items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"dist_soup.groups.{group}: {_short(members)} is not a list of objective names")
        unknown = [m for m in members if m not in (names or [])]
        if unknown:
            raise ConfigError(
                f"dist_soup.groups.{group}: {_short(unknown)} are not among dist_soup.objectives {_short(names)}"
            )
    return sec
