"""The update exchange overlapped with the backward (comm.reducer), the Jacobian-free path of
loss-based weightings, and the backward/step API, on real gloo processes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_soup import SoupEngine
from dist_soup.comm import Exchange

from .dist_utils import run_ranks

OBJ = ("a", "b")


class Net(nn.Module):
    """A trunk of several tensors (so several buckets) and two heads, plus a parameter that no
    loss uses and a head that rank 0 never uses."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
        self.head_a = nn.Linear(32, 1)
        self.head_b = nn.Linear(32, 1)
        self.spare = nn.Linear(32, 1)  # used by rank 1 only
        self.dead = nn.Parameter(torch.zeros(5))  # used by no rank

    def forward(self, x, rank: int):
        h = self.trunk(x)
        out_a = self.head_a(h).squeeze(-1)
        out_b = self.head_b(h).squeeze(-1)
        if rank == 1:
            out_b = out_b + 0.1 * self.spare(h).squeeze(-1)
        return out_a, out_b


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 8, generator=g)
    return x, torch.stack([x[:, 0] - x[:, 1], x[:, 0] + x[:, 2]], 1)


def losses(model, rank, step):
    x, y = batch(rank, step)
    a, b = model(x, rank)
    return {"a": ((a - y[:, 0]) ** 2).mean(), "b": ((b - y[:, 1]) ** 2).mean()}


def engine_for(model, codec, mode, solver="ew", **kw):
    opts = dict(
        jacobian_compressor=codec,
        update_compressor=codec,
        mode=mode,
        overlap_mb=1e-4,  # about 25 floats: a bucket closes at its first tensor that reaches it
        solve_every=1,
        gram="plain",
        seed=3,
    )
    if codec == "qsgd":
        opts.update(jacobian_options={"bits": 4}, update_options={"bits": 4})
    opts.update(kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return SoupEngine(model, opt, OBJ, "trunk", "vs", solver=solver, **opts)


# --- overlap = one exchange after the backward ----------------------------------------------
def _worker_overlap_equals_exchange(rank, P, codec, mode):
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    engine = engine_for(model, codec, mode)
    assert len(engine.reducer._plan(frozenset())[0]) >= 4  # several buckets
    opts = {"bits": 4} if codec == "qsgd" else {}
    reference = Exchange(codec, mode, seed=3, **opts)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        res = engine.backward(losses(model, rank, step))
        assert not res.skipped and "jacobian_s" not in res.timings
        # the same gradient, exchanged in one call after a plain backward
        twin.zero_grad(set_to_none=True)
        sum(losses(twin, rank, step).values()).backward()
        local = {f"U/{n}": (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in twin.named_parameters()}
        means = reference.mean_many(local)
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, means[f"U/{n}"]), (codec, mode, step, n)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                p.sub_(0.05 * p.grad)
                q.copy_(p)
    assert engine.u_exchange.stats.bytes_sent == reference.stats.bytes_sent
    assert engine.j_exchange.stats.calls == 0  # ew: no Jacobian ever


@pytest.mark.parametrize("codec,mode", [("qsgd", "allgather"), ("qsgd", "allreduce"), ("identity", "allreduce")])
def test_overlapped_update_equals_one_exchange_after_backward(codec, mode):
    run_ranks(_worker_overlap_equals_exchange, 2, codec, mode)


# --- non-finite gradient in a late bucket ---------------------------------------------------
def _worker_nonfinite_late_bucket(rank, P, feedback):
    torch.manual_seed(0)
    model = Net()
    # without error feedback QSGD finds the NaN itself while it encodes (no pre-pass): same outcome
    engine = engine_for(model, "qsgd", "allgather", update_options={"bits": 4, "error_feedback": feedback})
    engine.step(losses(model, rank, 0))  # residues exist now
    before = engine.u_exchange.state_dict()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def poison(grad):  # the first trunk layer's gradient: one of the last buckets to leave
        return grad * float("nan") if rank == 1 else grad

    h = model.trunk[0].weight.register_hook(poison)
    res = engine.step(losses(model, rank, 1))
    h.remove()
    assert res.skipped and engine.skipped_steps == 1
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    after = engine.u_exchange.state_dict()
    assert after["streams"].keys() == before["streams"].keys()
    for k, st in before["streams"].items():
        if feedback:
            assert torch.equal(st["residue"], after["streams"][k]["residue"]), k
            assert st["inner"] == after["streams"][k]["inner"], k
        else:  # QSGD alone keeps only its step (its random draws): put back too
            assert st == after["streams"][k], k
    # and the run goes on
    assert not engine.step(losses(model, rank, 2)).skipped


@pytest.mark.parametrize("feedback", [True, False])
def test_nonfinite_gradient_in_a_late_bucket_skips_everywhere_and_restores_residues(feedback):
    run_ranks(_worker_nonfinite_late_bucket, 2, feedback)


# --- non-finite Jacobian row of one objective ------------------------------------------------
class _NanGrad(torch.autograd.Function):
    """The identity forward; NaN for every non-zero gradient backward: a finite loss whose rows
    are not finite (zeros stay zeros: another objective's backward passes through it too)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.where(grad != 0, grad * float("nan"), grad)


def _worker_nonfinite_jacobian_row(rank, P, at_step):
    torch.manual_seed(0)
    model = Net()
    engine = engine_for(model, "qsgd", "allgather", solver="mgda", jacobian_options={"bits": 4, "error_feedback": True})
    for step in range(at_step):  # at_step 0: the layouts' first call (the control collective)
        assert not engine.step(losses(model, rank, step)).skipped
    before = engine.j_exchange.state_dict()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = losses(model, rank, at_step)
    if rank == 1:  # objective b's rows (the second objective, after a's left) are NaN on rank 1
        x, y = batch(rank, at_step)
        h = _NanGrad.apply(model.trunk(x))
        out["b"] = ((model.head_b(h).squeeze(-1) + 0.1 * model.spare(h).squeeze(-1) - y[:, 1]) ** 2).mean()
    res = engine.step(out)
    assert res.skipped and "jacobian_s" in res.timings and engine.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    after = engine.j_exchange.state_dict()["streams"]
    assert any(k.startswith("J/a/") for k in after)  # a's rows did leave
    fresh = {"residue": None, "inner": {"step": 0}}  # a stream first used in this step
    for k, st in after.items():
        was = before["streams"].get(k, fresh)
        assert (st["residue"] is None) == (was["residue"] is None), k
        assert st["residue"] is None or torch.equal(st["residue"], was["residue"]), k
        assert st["inner"] == was["inner"], k
    assert not engine.step(losses(model, rank, at_step + 1)).skipped  # and the run goes on


@pytest.mark.parametrize("at_step", [0, 2])
def test_nonfinite_jacobian_row_of_one_objective_skips_everywhere_and_restores_residues(at_step):
    """Objective a's rows are already on the wire when b's turn out NaN (the rows leave
    objective by objective): every rank skips, every J residue is put back."""
    run_ranks(_worker_nonfinite_jacobian_row, 2, at_step)


# --- gradient accumulation, backward/step API, loss-based solvers ---------------------------
def _worker_accumulation(rank, P):
    torch.manual_seed(0)
    model = Net()
    twin = copy.deepcopy(model)
    engine = engine_for(model, "identity", "allreduce")
    twin_engine = engine_for(twin, "identity", "allreduce")
    engine.step(losses(model, rank, 5))  # the weights of a solve, used by the local backward below
    twin_engine.step(losses(twin, rank, 5))
    model.zero_grad(set_to_none=True)
    calls = engine.u_exchange.stats.calls
    with engine.no_sync():
        engine.backward(losses(model, rank, 0))
    assert engine.u_exchange.stats.calls == calls  # nothing travelled
    engine.backward(losses(model, rank, 1))
    # the same, as one backward over both micro-batches
    twin.zero_grad(set_to_none=True)
    l0, l1 = losses(twin, rank, 0), losses(twin, rank, 1)
    twin_engine.backward({k: l0[k] + l1[k] for k in OBJ})
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(RuntimeError, match="no_sync"):
        with engine.no_sync():
            engine.step(losses(model, rank, 2))


def test_no_sync_accumulates_and_exchanges_once():
    run_ranks(_worker_accumulation, 2)


def _worker_loss_based(rank, P, solver):
    torch.manual_seed(0)
    model = Net()
    engine = engine_for(model, "qsgd", "allgather", solver=solver)
    for step in range(4):
        res = engine.step(losses(model, rank, step))
        assert res.solved and "jacobian_s" not in res.timings
    assert engine.j_exchange.stats.calls == 0
    w = engine.w.clone()
    everyone = [torch.zeros_like(w) for _ in range(P)]
    torch.distributed.all_gather(everyone, w)
    assert all(torch.equal(x, w) for x in everyone)  # the same weights with no broadcast
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(P)]
    torch.distributed.all_gather(gathered, flat)
    assert all(torch.equal(x, flat) for x in gathered)


@pytest.mark.parametrize("solver", ["famo", "dwa"])
def test_loss_based_solvers_need_no_jacobian(solver):
    run_ranks(_worker_loss_based, 2, solver)


def test_backward_with_user_optimizer_equals_step():
    torch.manual_seed(0)
    a, b = Net(), None
    b = copy.deepcopy(a)
    ea = engine_for(a, "qsgd", "allgather", solver="mgda")
    eb = SoupEngine(
        b,
        None,
        OBJ,
        "trunk",
        "vs",
        solver="mgda",
        jacobian_compressor="qsgd",
        update_compressor="qsgd",
        jacobian_options={"bits": 4},
        update_options={"bits": 4},
        overlap_mb=1e-4,  # about 25 floats: a bucket closes at its first tensor that reaches it
        solve_every=1,
        gram="plain",
        seed=3,
    )
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    for step in range(3):
        ea.step(losses(a, 0, step))
        opt_b.zero_grad(set_to_none=True)
        eb.backward(losses(b, 0, step))
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="optimizer=None"):
        eb.step(losses(b, 0, 3))


def test_single_objective_needs_no_shared_trunk():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    engine = SoupEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), ["loss"], update_compressor="identity")
    x = torch.randn(16, 4)
    first = engine.step({"loss": (model(x) ** 2).mean()}).losses["loss"]
    for _ in range(5):
        last = engine.step({"loss": (model(x) ** 2).mean()}).losses["loss"]
    assert last < first
    with pytest.raises(ValueError, match="shared"):
        SoupEngine(Net(), None, OBJ)


# --- the update's buckets ---------------------------------------------------------------------
def test_buckets_close_once_full_and_large_tensors_travel_whole():
    # reverse order of registration; a bucket closes once it holds overlap_mb (256 bytes here),
    # so each bias leaves with the weight after it, as in DDP
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    engine = SoupEngine(
        model, None, ["loss"], update_compressor="qsgd", update_options={"bits": 4}, overlap_mb=256 / 2**20
    )
    names = [n for n, _ in engine.params]
    buckets = [[names[i] for i in b] for b in engine.reducer._plan(frozenset())[0]]
    assert buckets == [["2.bias", "2.weight", "1.bias", "1.weight"], ["0.bias", "0.weight"]]
    # a tensor above the exchange's chunk size (4 MB) is one stream, not pieces name#j: the
    # reducer's buckets already pipeline the update
    big = nn.Linear(1100, 1000)  # 4.4 MB of weights
    engine = SoupEngine(big, None, ["loss"], update_compressor="qsgd", update_options={"bits": 4})
    engine.backward({"loss": big(torch.randn(2, 1100)).square().mean()})
    assert sorted(engine.u_exchange.state_dict()["streams"]) == ["U/bias", "U/weight"]
