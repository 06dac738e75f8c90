"""SoupEngine: the soup step on one process and on real gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_soup import SoupEngine
from dist_soup.moo import solvers
from dist_soup.moo.selection import Selection

from .dist_utils import run_ranks

OBJ = ("a", "b", "c")


class Net(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(k))

    def forward(self, x):
        h = self.trunk(x)
        return [head(h).squeeze(-1) for head in self.heads]


def data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    # conflicting targets: c pulls against a
    y = torch.stack([x[:, 0] + x[:, 1], x[:, 2] - x[:, 3], -(x[:, 0] + x[:, 1]) + 0.5 * x[:, 4]], 1)
    return x, y


def losses_of(model, x, y, objectives=OBJ):
    outs = model(x)
    return {k: ((outs[i] - y[:, i]) ** 2).mean() for i, k in enumerate(objectives)}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opts = dict(
        jacobian_compressor="identity",
        update_compressor="identity",
        gram="plain",
        probe_every=4,
        solve_every=1,
        selection={"rule": "threshold", "tau": 0.0},
        solver="mgda",
    )
    opts.update(kw)
    return model, SoupEngine(model, opt, OBJ, "trunk", "vs", **opts)


def test_single_process_step_reports_and_learns():
    model, engine = make()
    x, y = data()
    first = None
    for step in range(30):
        res = engine.step(losses_of(model, x, y))
        first = first or res
        assert math.isclose(sum(res.weights.values()), 1.0, rel_tol=1e-5)
        assert res.selected and set(res.selected) <= {n for n, _ in model.named_parameters() if n.startswith("trunk")}
        assert res.probed == (step % 4 == 0) and res.solved
    assert first.probed and first.step == 0
    assert all(res.losses[k] < first.losses[k] for k in ("a", "b"))
    assert engine.step_count == 30


def test_solve_cadence_reuses_weights_between_solves():
    model, engine = make(solve_every=3, probe_every=5)
    x, y = data()
    seen = []
    for _step in range(8):
        res = engine.step(losses_of(model, x, y))
        seen.append((res.solved, res.probed, tuple(res.weights.values())))
    assert [s for s, _, _ in seen] == [True, False, False, True, False, True, True, False]
    assert [p for _, p, _ in seen] == [True, False, False, False, False, True, False, False]
    assert seen[1][2] == seen[0][2] == seen[2][2] and seen[4][2] == seen[3][2]
    assert "jacobian_s" not in res.timings  # no Jacobian on a step that does not solve


def test_default_selection_is_every_tensor_without_probes():
    torch.manual_seed(0)
    model = Net()
    engine = SoupEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        OBJ,
        "trunk",
        jacobian_compressor="identity",
        update_compressor="identity",
    )
    x, y = data()
    res = [engine.step(losses_of(model, x, y)) for _ in range(26)]
    assert [r.step for r in res if r.solved] == [0, 25]
    assert not any(r.probed for r in res)
    assert res[0].selected == [n for n, _ in model.named_parameters() if n.startswith("trunk")]


def test_weights_equal_mgda_on_the_true_gram_of_the_selection():
    model, engine = make(selection={"rule": "all"})
    x, y = data()
    losses = losses_of(model, x, y)
    rows = [
        torch.stack([torch.autograd.grad(losses[k], p, retain_graph=True)[0].reshape(-1) for k in OBJ])
        for p in model.trunk.parameters()
    ]
    G = sum(r @ r.T for r in rows).double()
    expected = solvers.build("mgda").weights(G, torch.stack([losses[k].detach() for k in OBJ]))
    res = engine.step(losses)
    assert torch.allclose(torch.tensor([res.weights[k] for k in OBJ]), expected.float(), atol=1e-5)


def test_solver_and_selection_objects_equal_their_config_spelling():
    from dist_soup.moo.recipe import Level

    x, y = data()
    runs = []
    for kw in (
        dict(solver="mgda", solver_options={"momentum": 0.9}, selection={"rule": "top_m", "m": 2}),
        dict(solver=solvers.MGDA(momentum=0.9), selection=Selection("top_m", m=2)),
    ):
        model, engine = make(**kw)
        runs.append([engine.step(losses_of(model, x, y)).weights for _ in range(3)])
        runs[-1].append([p.detach().clone() for p in model.parameters()])
    assert runs[0][:3] == runs[1][:3]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][3], runs[1][3]))
    # A Solver object is a prototype: each engine solves with its own copy (no shared momentum).
    proto = solvers.MGDA(momentum=0.9)
    assert make(solver=proto)[1].recipe.solvers[0] is not proto
    with pytest.raises(ValueError, match="a Solver object carries its own options"):
        Level(("a",), solvers.MGDA(), {"momentum": 0.5})
    with pytest.raises(TypeError, match="a name or a Solver"):
        Level(("a",), 3)  # type: ignore[arg-type]


def test_bad_input_is_named():
    model, engine = make()
    x, y = data()
    losses = losses_of(model, x, y)
    with pytest.raises(ValueError, match="missing \\['c'\\]"):
        engine.step({k: losses[k] for k in ("a", "b")})
    with pytest.raises(ValueError, match="unknown \\['z'\\]"):
        engine.step({**losses, "z": losses["a"]})
    with pytest.raises(ValueError, match="scalar"):
        engine.step({**losses, "a": torch.ones(3, requires_grad=True)})
    with pytest.raises(ValueError, match="owns no trainable parameters"):
        SoupEngine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            OBJ,
            nn.Sequential(),
            jacobian_compressor="identity",
            update_compressor="identity",
        )
    with pytest.raises(ValueError, match="no submodule"):
        SoupEngine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            OBJ,
            "trunkk",
            jacobian_compressor="identity",
            update_compressor="identity",
        )
    with pytest.raises(ValueError, match="duplicate"):
        SoupEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), ("a", "a"), "trunk")
    with pytest.raises(ValueError, match="'rule' must be one of threshold, top_m, budget, all; got None"):
        make(selection={"tau": 0.0})  # no rule: no guessed default
    assert make(selection=None)[1].selection == Selection()


def test_single_objective_is_plain_training():
    torch.manual_seed(0)
    model = Net(k=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = SoupEngine(model, opt, ("a",), "trunk", jacobian_compressor="identity", update_compressor="identity")
    x, y = data()
    res = engine.step(losses_of(model, x, y, ("a",)))
    assert res.weights == {"a": pytest.approx(1.0)}


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_loss_policy_and_residues_stay_clean(policy):
    model, engine = make(jacobian_compressor="qsgd", update_compressor="topk", nonfinite=policy)
    x, y = data()
    engine.step(losses_of(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    losses = losses_of(model, x, y)
    losses["b"] = losses["b"] * float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite loss"):
            engine.step(losses)
        return
    res = engine.step(losses)
    assert res.skipped and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = engine.state_dict()
    flat = [t for t in _tensors(state) if t.is_floating_point()]
    assert flat and all(torch.isfinite(t).all() for t in flat)
    res = engine.step(losses_of(model, x, y))  # training goes on
    assert not res.skipped


def test_nonfinite_gradient_is_skipped():
    model, engine = make()
    x, y = data()
    losses = losses_of(model, x, y)
    # a finite loss whose gradient is not: sqrt at 0
    losses["a"] = losses["a"] + torch.sqrt(model.heads[0].bias.abs() - model.heads[0].bias.abs()).sum()
    res = engine.step(losses)
    assert res.skipped and engine.skipped_steps == 1


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_state_dict_round_trip_continues_identically():
    x, y = data()
    model, engine = make(jacobian_compressor="qsgd", update_compressor="qsgd")
    for _ in range(3):
        engine.step(losses_of(model, x, y))
    import copy

    snap_model = copy.deepcopy(model.state_dict())
    snap_opt = copy.deepcopy(engine.optimizer.state_dict())
    snap = copy.deepcopy(engine.state_dict())
    for _ in range(3):
        engine.step(losses_of(model, x, y))
    want = [p.detach().clone() for p in model.parameters()]
    model2, engine2 = make(seed=5, jacobian_compressor="qsgd", update_compressor="qsgd")
    model2.load_state_dict(snap_model)
    engine2.optimizer.load_state_dict(snap_opt)
    engine2.load_state_dict(snap)
    for _ in range(3):
        engine2.step(losses_of(model2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(want, model2.parameters()))


# --- real processes ------------------------------------------------------------------------
def _invariance_worker(rank, world, steps, out_dir, codec, gram, mode):
    x, y = data(64)
    model, engine = make(jacobian_compressor=codec, update_compressor=codec, gram=gram, mode=mode)
    half = 64 // world
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    weights = []
    for _ in range(steps):
        res = engine.step(losses_of(model, xs, ys))
        weights.append([res.weights[k] for k in OBJ])
    torch.save(
        {
            "params": [p.detach() for p in model.parameters()],
            "weights": torch.tensor(weights),
            "selected": res.selected,
        },
        f"{out_dir}/rank{rank}.pt",
    )


def test_two_ranks_on_halves_equal_one_rank_on_the_batch(tmp_path):
    steps = 6
    run_ranks(_invariance_worker, 2, steps, str(tmp_path), "identity", "plain", "allgather")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # every rank ends every run with bit-identical parameters
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    x, y = data(64)
    model, engine = make()
    for _ in range(steps):
        engine.step(losses_of(model, x, y))
    for a, b in zip(r0["params"], model.parameters()):
        assert torch.allclose(a, b.detach(), atol=1e-5), (a - b).abs().max()


def test_four_ranks_cross_gram_compressed_agree_bit_for_bit(tmp_path):
    run_ranks(_invariance_worker, 4, 5, str(tmp_path), "qsgd", "cross", "allgather")
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    for s in states[1:]:
        assert all(torch.equal(a, b) for a, b in zip(states[0]["params"], s["params"]))
        assert torch.equal(states[0]["weights"], s["weights"])
        assert states[0]["selected"] == s["selected"]
    assert torch.isfinite(states[0]["weights"]).all()
