"""topk / randomk / cltk and the ErrorFeedback wrapper: conservation, shared positions, the
LinearCodec protocol for P in-process ranks, state round trips, refusal of non-finite input."""

import pytest
import torch

from dist_soup.compress import ErrorFeedback, LinearCodec, Payload, build


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _stream(seed, steps, shape=(40, 50)):
    gen = _gen(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(steps)]


# --- topk -----------------------------------------------------------------------------------
def test_topk_sends_largest_and_conserves():
    c = build("topk", ratio=0.05)
    sent = torch.zeros(40, 50)
    total = torch.zeros(40, 50)
    for g in _stream(1, 6):
        x = g + (c.residue.view(40, 50) if c.residue is not None else 0)
        p = c.compress(g)
        assert p.parts[0].numel() == 100 and p.parts[0].dtype == torch.int32
        d = c.decompress(Payload.from_bytes(p.to_bytes()))
        # the sent entries are the 100 largest of g + residue
        kth = x.abs().flatten().topk(100).values[-1]
        assert (d != 0).sum() == 100 and (x.abs()[d != 0] >= kth).all()
        sent += d
        total += g
    assert torch.allclose(sent + c.residue.view(40, 50), total, atol=1e-5)


def test_topk_options():
    assert build("topk", k=7).compress(torch.randn(100)).parts[0].numel() == 7
    assert build("topk", ratio=1.0).compress(torch.randn(10)).parts[0].numel() == 10
    for kw in (dict(ratio=0), dict(ratio=1.5), dict(k=0), dict(k=2.5)):
        with pytest.raises(ValueError):
            build("topk", **kw)
    with pytest.raises(ValueError, match="already keeps"):
        build("topk", error_feedback=True)
    ef = build("topk", feedback=False, error_feedback=True)
    assert isinstance(ef, ErrorFeedback) and not isinstance(ef, LinearCodec)


def test_topk_state_resume_and_nonfinite():
    gs = _stream(2, 4)
    a = build("topk", ratio=0.1)
    for g in gs[:2]:
        a.compress(g)
    b = build("topk", ratio=0.1)
    b.load_state_dict(a.state_dict())
    for g in gs[2:]:
        assert torch.equal(a.compress(g).to_bytes(), b.compress(g).to_bytes())
    before = a.residue.clone()
    bad = gs[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        a.compress(bad)
    assert torch.equal(a.residue, before)


# --- error feedback wrapper --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,opts", [("qsgd", dict(bits=2)), ("fp16", {}), ("randomk", dict(ratio=0.1)), ("topk", dict(feedback=False))]
)
def test_error_feedback_conserves(name, opts):
    c = build(name, error_feedback=True, **opts)
    sent = torch.zeros(40, 50, dtype=torch.float64)
    total = torch.zeros(40, 50, dtype=torch.float64)
    for g in _stream(3, 8):
        d = c.decompress(Payload.from_bytes(c.compress(g).to_bytes()))
        sent += d.double()
        total += g.double()
    assert torch.allclose(sent + c.residue.double(), total, atol=1e-4)


def test_error_feedback_refuses_nonfinite_and_keeps_residue():
    c = build("qsgd", bits=2, error_feedback=True)
    g = torch.randn(3000, generator=_gen(4))
    c.compress(g)
    before = c.residue.clone()
    step = c.step
    for bad in (float("nan"), float("inf"), -float("inf")):
        h = g.clone()
        h[5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            c.compress(h)
        with pytest.raises(ValueError, match="non-finite"):
            c.encode_sum(h, None, 2)
    assert torch.equal(c.residue, before) and c.step == step
    with pytest.raises(ValueError, match="shape"):
        c.compress(torch.randn(10))


def test_error_feedback_state_resume():
    gs = [torch.randn(3000, generator=_gen(5 + i)) for i in range(4)]
    a = build("qsgd", bits=2, seed=3, error_feedback=True)
    for g in gs[:2]:
        a.compress(g)
    state = a.state_dict()
    b = build("qsgd", bits=2, seed=3, error_feedback=True)
    b.load_state_dict(state)
    assert torch.equal(b.residue, a.residue) and b.step == a.step
    for g in gs[2:]:
        assert torch.equal(a.compress(g).to_bytes(), b.compress(g).to_bytes())


# --- the LinearCodec protocol, simulated for P ranks in one process ---------------------------
def _allreduce_step(streams, gs):
    """agreement (max / sum / leader broadcast), sum of wires, decode on every rank."""
    P = len(streams)
    agreements = [s.agreement(g, r, P) for r, (s, g) in enumerate(zip(streams, gs))]
    if agreements[0] is None:
        agreed = None
    else:
        op = agreements[0][1]
        local = [a for a, _ in agreements]
        if op == "max":
            agreed = torch.stack(local).amax(0)
        elif op == "sum":
            agreed = torch.stack(local).sum(0)
        else:
            agreed = local[streams[0].leader(P)].clone()
    wires = [s.encode_sum(g, agreed, P) for s, g in zip(streams, gs)]
    total = torch.stack(wires).sum(0).to(wires[0].dtype)
    means = [s.decode_sum(total, agreed, P) for s in streams]
    for m in means[1:]:
        assert torch.equal(m, means[0])
    return means[0], wires, agreed


def test_randomk_linear_positions_shared():
    P = 4
    streams = [build("randomk", ratio=0.1, seed=9, rank=r) for r in range(P)]
    gs = [torch.randn(1000, generator=_gen(10 + r)) for r in range(P)]
    mean, wires, _ = _allreduce_step(streams, gs)
    true = torch.stack(gs).mean(0)
    kept = mean != 0
    assert kept.sum() == 100 and torch.allclose(mean[kept], true[kept], atol=1e-6)
    # the payload path picks the same positions as the linear path at the same step
    c = build("randomk", ratio=0.1, seed=9, rank=3)
    d = c.decompress(Payload.from_bytes(c.compress(gs[0]).to_bytes()))
    assert torch.equal(d != 0, kept)
    # next step: new positions
    mean2, _, _ = _allreduce_step(streams, gs)
    assert not torch.equal(mean2 != 0, kept)


def test_randomk_rescaled_is_unbiased():
    g = torch.randn(200, generator=_gen(11))
    c = build("randomk", ratio=0.25, rescale=True)
    acc = torch.zeros(200, dtype=torch.float64)
    N = 2000
    for _ in range(N):
        acc += c.decompress(c.compress(g)).double()
    # Var of one draw = g^2 (n/k - 1) = 3 g^2
    z = (acc / N - g.double()) / (g.double().abs() * (3 / N) ** 0.5)
    assert z.abs().max() < 5


def test_linear_error_feedback_qsgd_conserves():
    P = 3
    streams = [build("qsgd", bits=2, rank=r, error_feedback=True) for r in range(P)]
    sums = torch.zeros(5000, dtype=torch.float64)
    truth = torch.zeros(5000, dtype=torch.float64)
    for t in range(5):
        gs = [torch.randn(5000, generator=_gen(100 * t + r)) for r in range(P)]
        mean, _, _ = _allreduce_step(streams, gs)
        sums += mean.double()
        truth += torch.stack(gs).double().mean(0)
    residue_mean = torch.stack([s.residue for s in streams]).double().mean(0)
    assert torch.allclose(sums + residue_mean, truth, atol=1e-4)


def test_cltk_leader_cycles_and_low_pass_memory():
    P, beta = 3, 0.3
    streams = [build("cltk", k=20, beta=beta, rank=r) for r in range(P)]
    mem = [torch.zeros(500) for _ in range(P)]
    for t in range(5):
        gs = [torch.randn(500, generator=_gen(50 * t + r)) for r in range(P)]
        leader = streams[0].leader(P)
        assert leader == t % P and all(s.leader(P) == leader for s in streams)
        ps = [m + g for m, g in zip(mem, gs)]
        want_idx = ps[leader].abs().topk(20).indices.sort().values
        mean, wires, agreed = _allreduce_step(streams, gs)
        assert torch.equal(agreed.long(), want_idx)
        want = torch.zeros(500)
        want[want_idx] = torch.stack([p[want_idx] for p in ps]).mean(0)
        assert torch.allclose(mean, want, atol=1e-6)
        for r in range(P):  # m <- (1 - beta) m + beta (p - CLT(p))
            err = ps[r].clone()
            err[want_idx] = 0
            mem[r] = (1 - beta) * mem[r] + beta * err
            assert torch.allclose(streams[r].memory, mem[r], atol=1e-6)
    s = streams[1]
    fresh = build("cltk", k=20, beta=beta, rank=1)
    fresh.load_state_dict(s.state_dict())
    g = torch.randn(500, generator=_gen(999))
    assert torch.equal(fresh.compress(g).to_bytes(), s.compress(g).to_bytes())


def test_cltk_bad_agreement():
    c = build("cltk", k=5)
    with pytest.raises(ValueError, match="indices"):
        c.encode_sum(torch.randn(50), torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="range"):
        c.encode_sum(torch.randn(50), torch.full((5,), 70, dtype=torch.int32), 2)


def test_randomk_positions_uniform_and_distinct():
    from dist_soup.compress import RandomK

    for n, k in [(100, 10), (1000, 400), (1 << 20, 5000)]:
        p = RandomK.positions(7, n, k)
        assert p.numel() == k and p.unique().numel() == k and 0 <= int(p.min()) and int(p.max()) < n
        assert torch.equal(p, RandomK.positions(7, n, k))  # a pure function of the key
    counts = torch.zeros(200)
    N = 2000
    for key in range(N):
        counts[RandomK.positions(key, 200, 10)] += 1
    # each position is chosen with probability k/n = 0.05
    z = (counts - N * 0.05) / (N * 0.05 * 0.95) ** 0.5
    assert z.abs().max() < 4.5 and 0.7 < (z**2).mean() < 1.3
