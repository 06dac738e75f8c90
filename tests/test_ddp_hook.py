"""The DDP comm hook against plain DDP, on real gloo processes (2 ranks on 127.0.0.1)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_soup.integrations import ddp as ddp_hooks

from .dist_utils import run_ranks

MODES = ("allgather", "allreduce", "two_phase")


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )


def _data(rank: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression task shared by the ranks (same target map), different samples per rank."""
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(n, 16, generator=g)
    y = torch.tanh(x @ w / 4) + 0.01 * torch.randn(n, 1, generator=g)
    return x, y


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _step(model, opt, x, y) -> float:
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _same_on_every_rank(t: torch.Tensor, world: int) -> None:
    got = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(got, t)
    for r, other in enumerate(got):
        assert torch.equal(other, t), f"rank {r} holds different parameters"


def _identity_matches_plain(rank: int, world: int) -> None:
    x, y = _data(rank)
    base = _net(0)
    # Tiny buckets: several buckets per step, and DDP's bucket rebuild after the first step.
    cap = 0.004
    plain = DDP(copy.deepcopy(base), bucket_cap_mb=cap)
    hooked = {}
    for mode in MODES:
        for async_op in (False, True):
            model = DDP(copy.deepcopy(base), bucket_cap_mb=cap)
            state = ddp_hooks.register(model, "identity", mode, async_op=async_op)
            assert state.async_op is async_op
            hooked[(mode, async_op)] = (model, state)
        # Buckets cut into pieces of at most 262 values (several streams and collectives per bucket).
        model = DDP(copy.deepcopy(base), bucket_cap_mb=cap)
        state = ddp_hooks.register(model, "identity", mode, chunk_mb=0.001)
        assert state.exchange.chunk_mb == 0.001
        hooked[(mode, "chunks")] = (model, state)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, (m, _) in hooked.items()}
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(4):
        _step(plain, opt_plain, x, y)
        for k, (m, _) in hooked.items():
            _step(m, opts[k], x, y)
    ref = _flat(plain)
    n_params = ref.numel()
    for (mode, async_op), (m, state) in hooked.items():
        got = _flat(m)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (
            f"identity {mode} async={async_op}: max diff {(got - ref).abs().max():.3g}"
        )
        _same_on_every_rank(got, world)
        # more buckets than steps: several buckets per step after DDP's rebuild
        assert state.calls > 4, f"{mode}: expected several buckets per step, got {state.calls} calls in 4 steps"
        # identity sends every fp32 gradient value at least once per step
        assert state.exchange.stats.bytes_sent >= 4 * n_params * 4, (mode, state.exchange.stats.bytes_sent)
        assert state.exchange.stats.bytes_received > 0
    # The hook moved the parameters (the test would pass trivially if nothing trained).
    assert not torch.allclose(ref, _flat(base))

    # A non-finite gradient on one rank fails the step on every rank (no hang, no garbage).
    for async_op in (False, True):
        model = DDP(copy.deepcopy(base))
        ddp_hooks.register(model, "qsgd", "allgather", async_op=async_op)
        bad_x = x.clone()
        if rank == 1:
            bad_x[0, 0] = float("nan")
        with pytest.raises(Exception, match="non-finite"):
            torch.nn.functional.mse_loss(model(bad_x), y).backward()

    # Bad configurations are refused before anything is installed.
    fresh = DDP(copy.deepcopy(base))
    with pytest.raises(ValueError, match="chunk_mb"):
        ddp_hooks.register(fresh, "identity", "allgather", chunk_mb=0)
    with pytest.raises(ValueError, match="mode"):
        ddp_hooks.register(fresh, "identity", "ring")
    with pytest.raises(ValueError, match="zip"):
        ddp_hooks.register(fresh, "zip", "allgather")


def test_identity_hook_equals_plain_ddp():
    run_ranks(_identity_matches_plain, 2)


def _compressed_converges(rank: int, world: int) -> None:
    x, y = _data(rank)
    base = _net(1)
    steps, lr = 120, 0.1
    configs = {
        "plain": None,
        "qsgd4 allgather": ("qsgd", "allgather", {"bits": 4}),
        "qsgd4 allreduce": ("qsgd", "allreduce", {"bits": 4}),
        "adacomp allgather": ("adacomp", "allgather", {}),
    }
    losses, states, models = {}, {}, {}
    for key, cfg in configs.items():
        model = DDP(copy.deepcopy(base))
        if cfg is not None:
            codec, mode, opts = cfg
            states[key] = ddp_hooks.register(model, codec, mode, **opts)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        first = _step(model, opt, x, y)
        for _ in range(steps - 1):
            _ = _step(model, opt, x, y)
        models[key] = model
        # Mean loss over the ranks' data, with the final parameters.
        with torch.no_grad():
            final = torch.tensor([torch.nn.functional.mse_loss(model(x), y).item()])
        dist.all_reduce(final)
        losses[key] = (first, float(final) / world)
        _same_on_every_rank(_flat(model), world)

    first_plain, plain = losses["plain"]
    assert plain < 0.2 * first_plain, f"plain DDP did not train: {losses}"
    for key, (first, final) in losses.items():
        assert final < 0.2 * first, f"{key} did not train: {losses}"
        assert final <= 1.5 * plain + 2e-3, f"{key} ended far from plain DDP: {losses}"
    n_bytes = 4 * sum(p.numel() for p in base.parameters())
    # allgather qsgd 4-bit: 4 bits + one fp32 scale per 512 values (about 7.9x); allreduce sums
    # the levels in int8 (P * s = 14 fits), so 8 bits a value (about 4x); adacomp: far smaller.
    limits = {"qsgd4 allgather": n_bytes / 6, "qsgd4 allreduce": n_bytes / 3.5, "adacomp allgather": n_bytes / 20}
    sent = {}
    for key, state in states.items():
        per_step = state.exchange.stats.bytes_sent / steps
        sent[key] = per_step
        assert 0 < per_step < limits[key], f"{key}: {per_step:.0f} bytes/step sent, dense is {n_bytes}"
    if rank == 0:
        print(f"final losses {losses}; bytes sent per step {sent}; dense {n_bytes}")


def test_qsgd_and_adacomp_hooks_train_like_plain_ddp():
    run_ranks(_compressed_converges, 2)


def test_register_rejects_a_plain_module():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        ddp_hooks.register(torch.nn.Linear(2, 2), "identity")
