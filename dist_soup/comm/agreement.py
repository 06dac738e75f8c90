"""Configuration agreement: every rank checks, in one small collective, that all ranks are about
to run the same exchange, and every rank raises the same kind of error when they are not.

Each setting (codec, seed, mode, world size, bucket and piece sizes, the codec options, and the call's
tensor names, shapes and dtypes) is hashed to its own 62-bit word ``w_i``. One all-reduce with
MAX of ``[status, w, -w]`` gives every rank ``max_r w_i`` and ``min_r w_i``; a setting differs
somewhere iff ``max != min``, and since the result is the same on every rank, every rank takes
the same decision: all raise, naming that setting, or all go on. Words are fixed in number, so
the control collective itself has the same shape on every rank whatever the configurations are
(a mismatch can never turn into a hang or into garbage). When only the tensor lists differ and
their lengths agree, a second round of per-tensor words names the first tensor that differs.

The three status words ride on the same collective: a rank whose input was rejected (bad type,
shape change, non-finite values) still takes part, so the others learn of it and raise too
instead of waiting in the next collective. Codec options are hashed into a fixed number of slots
(by option name), so a missing option changes the word of its slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .transport import Transport

PROTOCOL = 1
OPTION_SLOTS = 8
_MASK62 = (1 << 62) - 1


class NonFiniteError(ValueError):
    """Some rank's input holds inf or NaN: every rank raises it, nothing was encoded."""


def word(text: str) -> int:
    """A stable 62-bit hash of ``text`` (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & _MASK62


def stream_id(key: str) -> int:
    """The integer stream id of a named stream (63 bits, stable across processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Setting:
    label: str  # what the setting is, for the error message
    local: str  # this rank's value, for the error message
    word: int


TensorSpec = tuple[str, tuple[int, ...], torch.dtype]


def exchange_settings(
    codec: str,
    options: dict[str, Any],
    seed: int,
    mode: str,
    world_size: int,
    bucket_mb: float,
    chunk_mb: float | None = None,
) -> list[Setting]:
    """The settings fixed at construction, as words (one per setting, options in slots).
    ``chunk_mb`` None: tensors are never cut into pieces."""
    chunk = repr(float(chunk_mb)) if chunk_mb else "None"
    out = [
        Setting("protocol version", str(PROTOCOL), word(f"protocol={PROTOCOL}")),
        Setting("compressor", repr(codec), word(f"codec={codec}")),
        Setting("seed", str(seed), word(f"seed={seed}")),
        Setting("mode", repr(mode), word(f"mode={mode}")),
        Setting("world size", str(world_size), word(f"world_size={world_size}")),
        Setting("bucket_mb", repr(float(bucket_mb)), word(f"bucket_mb={float(bucket_mb)!r}")),
        Setting("chunk_mb", chunk, word(f"chunk_mb={chunk}")),
    ]
    slots: list[list[str]] = [[] for _ in range(OPTION_SLOTS)]
    for key in sorted(options):
        slots[word(key) % OPTION_SLOTS].append(f"{key}={options[key]!r}")
    mine = ", ".join(f"{k}={options[k]!r}" for k in sorted(options)) or "none"
    for i, items in enumerate(slots):
        if items:
            label = "codec option " + " / ".join(repr(s.split("=", 1)[0]) for s in items)
            local = ", ".join(items)
        else:
            label = "a codec option"
            local = f"no option there (its options: {mine})"
        out.append(Setting(label, local, word(f"slot{i}:" + "\0".join(items))))
    return out


def tensor_settings(specs: Sequence[TensorSpec]) -> list[Setting]:
    names = [s[0] for s in specs]
    shapes = [tuple(s[1]) for s in specs]
    dtypes = [str(s[2]).replace("torch.", "") for s in specs]
    short = lambda xs: repr(xs if len(xs) <= 6 else [*xs[:6], "..."])  # noqa: E731
    return [
        Setting("number of tensors", str(len(specs)), word(f"n={len(specs)}")),
        Setting("tensor names (order matters)", short(names), word("names:" + "\0".join(names))),
        Setting("tensor shapes", short(shapes), word("shapes:" + repr(shapes))),
        Setting("tensor dtypes", short(dtypes), word("dtypes:" + "\0".join(dtypes))),
    ]


N_STATUS = 3


def agree_async(
    transport: Transport,
    settings: Sequence[Setting] | None,
    specs: Sequence[TensorSpec],
    *,
    n_settings: int,
    local_error: Exception | None = None,
    nonfinite: int | None = None,
) -> Callable[[], tuple[int, int]]:
    """Launch the control collective of one exchange call now; the returned function waits for
    it, raises on every rank if anything is off, and returns (bytes handed to collectives,
    number of collectives). Work that needs no collective (the encoding of a first bucket) can
    run in between, hiding the control round trip.

    ``settings`` is None when this rank could not even describe its call (``local_error`` says
    why); it then sends zeros, and the status word tells the others. ``nonfinite`` is the index
    in ``specs`` of the first tensor holding inf or NaN on this rank.
    """
    rank = transport.rank
    words = [s.word for s in settings] if settings is not None else [0] * n_settings
    if len(words) != n_settings:
        raise ValueError(f"internal: {len(words)} setting words, expected {n_settings}")
    status = [
        rank + 1 if local_error is not None else 0,
        rank + 1 if nonfinite is not None else 0,
        nonfinite + 1 if nonfinite is not None else 0,
    ]
    ctl = torch.tensor(status + words + [-w for w in words], dtype=torch.int64, device=transport.device)
    work = transport.all_reduce_async_(ctl, "max")
    return lambda: _check(transport, work.wait(), settings, specs, n_settings, local_error, nonfinite)


def _check(
    transport: Transport,
    ctl: torch.Tensor,
    settings: Sequence[Setting] | None,
    specs: Sequence[TensorSpec],
    n_settings: int,
    local_error: Exception | None,
    nonfinite: int | None,
) -> tuple[int, int]:
    rank = transport.rank
    nbytes, ncoll = ctl.numel() * 8, 1
    got = ctl.cpu().tolist()
    st, hi, lo = got[:N_STATUS], got[N_STATUS : N_STATUS + n_settings], [-x for x in got[N_STATUS + n_settings :]]

    if local_error is not None:
        raise local_error
    if st[0]:
        raise ValueError(
            f"rank {st[0] - 1} rejected its input to this exchange call (its own error says why); "
            f"rank {rank} stops too so that no rank waits in a collective"
        )
    differ = [i for i in range(n_settings) if hi[i] != lo[i]]
    assert settings is not None
    if differ:
        labels = [settings[i].label for i in differ]
        n_tensors_differs = any(l == "number of tensors" for l in labels)
        per_tensor = [l for l in labels if l.startswith("tensor ")]
        if per_tensor and not n_tensors_differs and len(differ) == len(per_tensor):
            _name_tensor(transport, specs)  # raises, naming the first tensor that differs
        first = differ[0]
        raise ValueError(
            f"exchange configuration differs across ranks: {', '.join(labels)}; this rank ({rank}) has "
            f"{settings[first].label} = {settings[first].local}. Every rank raises this error; "
            "make the setting identical on all ranks"
        )
    if st[1]:
        idx = st[2] - 1
        name = specs[idx][0] if 0 <= idx < len(specs) else f"#{idx}"
        if nonfinite is not None:
            raise NonFiniteError(
                f"tensor {specs[nonfinite][0]!r} holds non-finite values (inf or NaN) on rank {rank}; "
                "nothing was encoded and no residue changed"
            )
        raise NonFiniteError(
            f"tensor {name!r} holds non-finite values (inf or NaN) on rank {st[1] - 1}; "
            f"rank {rank} stops too, nothing was encoded and no residue changed"
        )
    return nbytes, ncoll


def _name_tensor(transport: Transport, specs: Sequence[TensorSpec]) -> None:
    """Second round (lists of equal length that differ): raise naming the first tensor."""
    n = len(specs)
    names = [word("name:" + s[0]) for s in specs]
    kinds = [word(f"shape:{tuple(s[1])}:{s[2]}") for s in specs]
    ctl = torch.tensor(
        names + kinds + [-w for w in names] + [-w for w in kinds], dtype=torch.int64, device=transport.device
    )
    transport.all_reduce_(ctl, "max")
    got = ctl.cpu().tolist()
    hi, lo = got[: 2 * n], [-x for x in got[2 * n :]]
    for i in range(n):
        name_differs = hi[i] != lo[i]
        kind_differs = hi[n + i] != lo[n + i]
        if name_differs or kind_differs:
            what = (
                "name"
                if name_differs and not kind_differs
                else ("shape/dtype" if kind_differs and not name_differs else "name and shape/dtype")
            )
            name, shape, dtype = specs[i]
            raise ValueError(
                f"exchange configuration differs across ranks: tensor #{i} {what} differs; this rank "
                f"({transport.rank}) has {name!r} with shape {tuple(shape)} and dtype {dtype}. Every "
                "rank raises this error; pass the same tensors, in the same order, on all ranks"
            )
    raise ValueError("exchange configuration differs across ranks: the tensor lists differ")


def agree_locally(error: Exception | None, nonfinite: int | None, specs: list[TensorSpec]) -> None:
    """The control step of a group of one: only local checks."""
    if error is not None:
        raise error
    if nonfinite is not None:
        raise NonFiniteError(
            f"tensor {specs[nonfinite][0]!r} holds non-finite values (inf or NaN) on rank 0; "
            "nothing was encoded and no residue changed"
        )
