"""AdaComp: the selection rule against a direct reference, conservation, every index format,
state round trips, non-finite refusal, and compression ratios on a real small CNN's gradients."""

import pytest
import torch
from torch import nn

from dist_soup.compress import Payload, build
from dist_soup.compress.adacomp import INDEX_FORMATS


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference_step(r, g, L, values):
    """The rule written out directly: G = r + g, H = G + g, send |H_i| >= max_bin |G|."""
    G = (r + g).reshape(-1)
    H = (G + g.reshape(-1)).abs()
    n = G.numel()
    send = torch.zeros(n, dtype=torch.bool)
    for start in range(0, n, L):
        gmax = G[start : start + L].abs().max()
        if gmax > 0:
            send[start : start + L] = H[start : start + L] >= gmax
    dec = torch.zeros(n)
    if values == "ternary":
        scale = G[send].abs().mean() if send.any() else 0.0
        dec[send] = torch.sign(G[send]) * scale
    else:
        dec[send] = G[send].half().float()
    return dec.view(g.shape), (G - dec).view(g.shape)


@pytest.mark.parametrize("values", ["ternary", "fp16"])
@pytest.mark.parametrize(
    "shape,coding", [((16, 8, 3, 3), "auto"), ((40, 130), "auto"), ((16, 8, 3, 3), "design"), ((1234,), "design")]
)
def test_matches_reference_and_conserves(values, shape, coding):
    c = build("adacomp", values=values, index_coding=coding)
    L = c.bins_for(shape)
    r = torch.zeros(shape)
    sent = torch.zeros(shape, dtype=torch.float64)
    total = torch.zeros(shape, dtype=torch.float64)
    formats = set()
    for t in range(8):
        g = torch.randn(shape, generator=_gen(t)) * (1 + t % 3)
        p = c.compress(g)
        formats.add(p.meta[0])
        assert p.nbytes == p.to_bytes().numel()
        d = c.decompress(Payload.from_bytes(p.to_bytes()))
        want, r = _reference_step(r, g, L, values)
        assert torch.allclose(d, want, atol=1e-6)
        assert torch.equal(d != 0, want != 0)
        assert torch.allclose(c.state_dict()["residue"], r, atol=1e-5)
        sent += d.double()
        total += g.double()
    # conservation: what was sent plus what is owed equals what came in
    assert torch.allclose(sent + c.state_dict()["residue"].double(), total, atol=1e-4)
    if coding == "design":
        assert formats <= {INDEX_FORMATS["offsets"], INDEX_FORMATS["bitmap"]}


def test_each_index_format_round_trips():
    seen = {}
    gen = _gen(5)
    for coding, dens in [("design", 1.0), ("design", 0.01), ("auto", 0.01)]:
        c = build("adacomp", bin_size=64, index_coding=coding)
        for _ in range(4):
            g = torch.randn(4096, generator=gen) * (torch.rand(4096, generator=gen) < dens)
            p = c.compress(g)
            q = Payload.from_bytes(p.to_bytes())
            assert torch.equal(c.decompress(q), c.decompress(p))
            seen[p.meta[0]] = p
    assert set(seen) == set(INDEX_FORMATS.values())
    # bits accounted exactly: the chosen form is the smallest one
    p = seen[INDEX_FORMATS["rice"]]
    assert p.nbytes < 4096 * 4 / 20


def test_zero_and_tiny_tensors():
    c = build("adacomp")
    p = c.compress(torch.zeros(3, 5, 7, 7))
    assert p.meta[3] == 0 and torch.equal(c.decompress(p), torch.zeros(3, 5, 7, 7))
    c = build("adacomp")
    g = torch.tensor([0.5])
    d = c.decompress(c.compress(g))
    assert torch.allclose(d, g)  # one value: it is its bin's max, always sent


def test_state_dict_resume_and_nonfinite():
    gs = [torch.randn(30, 40, generator=_gen(10 + i)) for i in range(5)]
    a = build("adacomp")
    for g in gs[:2]:
        a.compress(g)
    b = build("adacomp")
    b.load_state_dict(a.state_dict())
    for g in gs[2:4]:
        assert torch.equal(a.compress(g).to_bytes(), b.compress(g).to_bytes())
    before = a.state_dict()["residue"]
    for bad in (float("nan"), float("inf")):
        h = gs[4].clone()
        h[3, 3] = bad
        with pytest.raises(ValueError, match="non-finite"):
            a.compress(h)
    assert torch.equal(a.state_dict()["residue"], before)
    assert torch.equal(a.compress(gs[4]).to_bytes(), b.compress(gs[4]).to_bytes())
    with pytest.raises(ValueError, match="shape"):
        a.compress(torch.randn(5))
    with pytest.raises(ValueError, match="already keeps"):
        build("adacomp", error_feedback=True)


def test_malformed_adacomp_payloads():
    c = build("adacomp", bin_size=64, index_coding="design")
    gen = _gen(20)
    g = torch.randn(4096, generator=gen) * (torch.rand(4096, generator=gen) < 0.05)
    p = c.compress(g)
    assert p.meta[0] == INDEX_FORMATS["offsets"]
    bad_meta = [list(p.meta) for _ in range(5)]
    bad_meta[0][0] = 9
    bad_meta[1][2] = 1
    bad_meta[2][3] = 5000
    bad_meta[3][4] = 0x7FC00000  # NaN scale
    bad_meta[4][5] = 7  # aux on a non-rice format
    for meta in bad_meta:
        with pytest.raises(ValueError):
            c.decompress(Payload.from_bytes(Payload(p.codec, p.shape, p.dtype, tuple(meta), p.parts).to_bytes()))
    # a consistent header over corrupted bits: decoding refuses or yields a finite tensor of the shape
    gen = _gen(21)
    raised = 0
    for _ in range(30):
        data = p.parts[0].clone()
        k = torch.randint(0, data.numel(), (4,), generator=gen)
        data[k] ^= torch.randint(1, 256, (4,), generator=gen, dtype=torch.uint8)
        q = Payload.from_bytes(Payload(p.codec, p.shape, p.dtype, p.meta, [data]).to_bytes())
        try:
            out = c.decompress(q)
            assert out.shape == g.shape and torch.isfinite(out).all()
        except ValueError:
            raised += 1
    assert raised > 0


def _digits_cnn_stream(steps, coding="auto"):
    """Train a small CNN on sklearn's bundled digits, compressing every gradient with AdaComp.

    Returns fp32 bytes / AdaComp bytes (headers included) for conv kernels and dense weights.
    """
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    streams = {name: build("adacomp", index_coding=coding) for name, _ in model.named_parameters()}
    raw = {"conv": 0, "dense": 0}
    sent = {"conv": 0, "dense": 0}
    gen = _gen(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        for name, p in model.named_parameters():
            payload = streams[name].compress(p.grad)
            p.grad.copy_(streams[name].decompress(payload))  # train on what was sent
            kind = {4: "conv", 2: "dense"}.get(p.dim())
            if kind:
                raw[kind] += p.numel() * 4
                sent[kind] += payload.nbytes
        opt.step()
    return {k: raw[k] / sent[k] for k in raw}, losses


def test_ratio_on_real_gradient_stream():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only contend on a shared machine
    try:
        ratios, losses = _digits_cnn_stream(60)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0] * 0.8  # it trains on the compressed gradients
    assert ratios["conv"] >= 25, ratios
    assert ratios["dense"] >= 120, ratios
