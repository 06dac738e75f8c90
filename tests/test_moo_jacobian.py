"""dist_soup.moo.jacobian: batched == loop == one autograd.grad per loss; heads; fallback."""

import pytest
import torch
from torch import nn

import dist_soup.moo.jacobian as jac_mod
from dist_soup.moo.jacobian import fallback_reason, jacobian, reset_fallback


def _model_and_losses(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])
    x = torch.randn(16, 5)
    y = torch.randn(3, 16, 1)
    feats = trunk(x)
    losses = [((h(feats) - y[k]) ** 2).mean() for k, h in enumerate(heads)]
    return trunk, heads, losses


def _reference(losses, params):
    out = []
    for p in params:
        rows = []
        for loss in losses:
            g = torch.autograd.grad(loss, p, retain_graph=True, allow_unused=True)[0]
            rows.append(torch.zeros_like(p) if g is None else g)
        out.append(torch.stack(rows))
    return out


def test_batched_equals_loop_equals_reference_with_separate_heads():
    reset_fallback()
    trunk, heads, losses = _model_and_losses()
    params = list(trunk.parameters()) + list(heads.parameters())
    ref = _reference(losses, params)
    batched = jacobian(losses, params)
    assert fallback_reason() is None
    loop = jacobian(losses, params, batched=False)
    assert len(batched) == len(params)
    for b, l, r, p in zip(batched, loop, ref, params):
        assert b.shape == (3, *p.shape)
        torch.testing.assert_close(b, r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l, r, rtol=1e-5, atol=1e-6)
    # Head k is reached only by objective k: the other rows are exact zeros.
    head_w = batched[len(list(trunk.parameters()))]  # heads[0].weight
    assert head_w[0].abs().sum() > 0
    assert torch.equal(head_w[1], torch.zeros_like(head_w[1]))
    assert torch.equal(head_w[2], torch.zeros_like(head_w[2]))
    # .grad is untouched (no .backward()).
    assert all(p.grad is None for p in params)


def test_rows_objective_by_objective_and_a_constant_loss():
    """jacobian_rows gives objective k's rows once its pass is done (each loss on its own, so
    equal to one autograd.grad per loss, bit for bit); a loss without a graph has zero rows."""
    trunk, heads, losses = _model_and_losses()
    params = list(trunk.parameters()) + list(heads.parameters())
    ref = _reference(losses, params)
    losses = [losses[0], torch.tensor(2.0), losses[2]]
    seen = []
    for k, rows in jac_mod.jacobian_rows(losses, params, batched=False):
        seen.append(k)
        for row, r in zip(rows, ref):
            if k != 1:
                assert torch.equal(row[k], r[k])
            else:
                assert torch.equal(row[k], torch.zeros_like(r[k]))
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("batched", [True, False])
def test_rows_written_into_the_callers_memory(batched):
    """out=: the rows are the caller's tensors (whatever they held before), same values."""
    reset_fallback()
    trunk, heads, losses = _model_and_losses(2)
    params = list(trunk.parameters()) + list(heads.parameters())
    want = jacobian(losses, params, batched=batched)
    out = [torch.full((3, *p.shape), float("nan")) for p in params]
    for _, rows in jac_mod.jacobian_rows(losses, params, batched=batched, out=out):
        assert all(r is o for r, o in zip(rows, out))
    assert all(torch.equal(o, w) for o, w in zip(out, want))
    with pytest.raises(ValueError, match=r"out\[1\] must be a contiguous tensor of shape \(3, 8\)"):
        next(jac_mod.jacobian_rows(losses, params, out=[out[0], torch.zeros(3, 9)] + out[2:]))
    with pytest.raises(ValueError, match="out holds 1 tensors"):
        next(jac_mod.jacobian_rows(losses, params, out=out[:1]))


def test_retain_graph_false_frees_the_graph_after_a_verified_batched_call():
    reset_fallback()
    trunk, _, losses = _model_and_losses(1)
    params = list(trunk.parameters())
    jacobian(losses, params)  # verifies the batched path
    first = jacobian(losses, params, retain_graph=False)
    assert len(first) == len(params)
    with pytest.raises(RuntimeError):
        jacobian(losses, params, batched=False)


class _NoVmap(torch.autograd.Function):
    """Identity whose backward reads a Python number from the gradient: impossible under vmap."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = 1.0 if float(grad.abs().sum().item()) >= 0 else 0.0
        return grad * scale


def test_falls_back_to_the_loop_and_remembers():
    reset_fallback()
    torch.manual_seed(3)
    lin = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    h = _NoVmap.apply(lin(x))
    losses = [h[:, 0].pow(2).mean(), h[:, 1].sin().mean(), (h[:, 2] * h[:, 0]).mean()]
    params = list(lin.parameters())
    ref = _reference(losses, params)
    got = jacobian(losses, params)
    assert fallback_reason() is not None
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    # Remembered: the next call does not try the batched path (which would fail again).
    calls = []
    original = jac_mod._batched

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    jac_mod._batched = spy
    try:
        again = jacobian(losses, params)
    finally:
        jac_mod._batched = original
    assert calls == []
    for g, r in zip(again, ref):
        torch.testing.assert_close(g, r)
    reset_fallback()
    assert fallback_reason() is None


def test_an_error_shared_by_both_paths_is_not_recorded_as_a_fallback():
    reset_fallback()
    trunk, _, losses = _model_and_losses(2)
    params = list(trunk.parameters())
    jacobian(losses, params, retain_graph=True)
    jacobian(losses, params, retain_graph=False)  # frees the graph
    with pytest.raises(RuntimeError):
        jacobian(losses, params)
    assert fallback_reason() is None


def test_bad_inputs():
    trunk, _, losses = _model_and_losses()
    params = list(trunk.parameters())
    with pytest.raises(ValueError, match="scalar"):
        jacobian([losses[0], torch.ones(2, requires_grad=True)], params)
    with pytest.raises(ValueError, match="at least one loss"):
        jacobian([], params)
    with pytest.raises(ValueError, match="at least one parameter"):
        jacobian(losses, [])
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match="does not require grad"):
        jacobian(losses, [frozen])
    with pytest.raises(ValueError, match="no loss requires grad"):
        jacobian([torch.tensor(1.0), torch.tensor(2.0)], params)
    with pytest.raises(TypeError):
        jacobian(torch.stack(losses), params)
