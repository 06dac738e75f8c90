"""QSGD: unbiasedness, variance bound, exact sizes, wire round trips, reproducibility,
the shared-scale all-reduce path for P in-process ranks, compiled == eager kernels."""

import math

import pytest
import torch

from dist_soup.compress import NonFiniteInput, Payload, build, kernels
from dist_soup.compress.qsgd import omega_codes, omega_decode, sum_dtype, write_bits


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _expected_var(x, bits, d, norm):
    """Exact per-value variance of QSGD: (n/s)^2 p (1 - p), p = frac(s|x|/n)."""
    s = (1 << (bits - 1)) - 1
    xb = torch.nn.functional.pad(x.double(), (0, (-x.numel()) % d)).view(-1, d)
    n = xb.abs().amax(1) if norm == "max" else xb.norm(dim=1)
    r = s * xb.abs() / n[:, None]
    p = r - r.floor()
    return ((n[:, None] / s) ** 2 * p * (1 - p)).view(-1)[: x.numel()]


@pytest.mark.parametrize("bits,norm", [(2, "max"), (4, "l2"), (8, "max")])
def test_unbiased_mean_converges(bits, norm):
    x = torch.randn(1536, generator=_gen(1))
    c = build("qsgd", bits=bits, norm=norm, bucket_size=128, seed=7)
    N = 600
    acc = torch.zeros(x.numel(), dtype=torch.float64)
    for _ in range(N):
        acc += c.decompress(c.compress(x)).double()
    mean = acc / N
    var = _expected_var(x, bits, 128, norm)
    z = (mean - x.double()) / torch.sqrt(var / N).clamp_min(1e-12)
    exact = var == 0
    assert torch.allclose(mean[exact], x.double()[exact], atol=1e-6)
    z = z[~exact]
    assert z.abs().max() < 6.0
    assert 0.85 < (z**2).mean() < 1.15  # the spread matches the exact variance


@pytest.mark.parametrize("bits", [2, 4])
def test_l2_variance_bound(bits):
    d = 256
    s = (1 << (bits - 1)) - 1
    x = torch.randn(8 * d, generator=_gen(2)) * torch.linspace(0.1, 3, 8 * d)
    c = build("qsgd", bits=bits, norm="l2", bucket_size=d, seed=3)
    N = 200
    err = torch.zeros(8, dtype=torch.float64)
    for _ in range(N):
        e = (c.decompress(c.compress(x)) - x).double().view(8, d)
        err += (e**2).sum(1)
    err /= N
    bound = min(d / s**2, math.sqrt(d) / s) * (x.double().view(8, d) ** 2).sum(1)
    assert (err <= bound).all()
    # and it is the exact variance, not merely below the bound
    exp = _expected_var(x, bits, d, "l2").view(8, d).sum(1)
    assert torch.allclose(err, exp, rtol=0.25)


@pytest.mark.parametrize("coding", ["dense", "elias"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_through_bytes(coding, bits, dtype):
    g = torch.randn(37, 111, generator=_gen(bits)).to(dtype)
    c = build("qsgd", bits=bits, coding=coding, bucket_size=64)
    p = c.compress(g)
    buf = p.to_bytes()
    assert buf.numel() == p.nbytes
    q = Payload.from_bytes(buf)
    out = c.decompress(q)
    assert out.shape == g.shape and out.dtype == dtype
    assert torch.equal(out, c.decompress(p))
    # decoding in fp32 then casting gives the same; in fp32 every value lies on its bucket's grid
    p32 = Payload(p.codec, p.shape, torch.float32, p.meta, p.parts)
    ref = c.decompress(p32)
    assert torch.equal(out, ref.to(dtype))
    s = (1 << (bits - 1)) - 1
    scale = p.parts[0]
    flat = torch.nn.functional.pad(ref.reshape(-1), (0, (-g.numel()) % 64)).view(-1, 64)
    lv = flat / (scale[:, None] / s)
    assert (lv - lv.round()).abs().max() < 1e-3 and lv.abs().max() <= s + 1e-3


def test_elias_and_dense_decode_identically():
    g = torch.randn(5000, generator=_gen(4))
    for bits in (2, 4, 8):
        a = build("qsgd", bits=bits, norm="l2", seed=5)
        b = build("qsgd", bits=bits, norm="l2", seed=5, coding="elias")
        assert torch.equal(a.decompress(a.compress(g)), b.decompress(b.compress(g)))


def _pad8(b):
    return (b + 7) // 8 * 8


def test_exact_dense_size():
    for n, bits, d in [(100_000, 4, 512), (4097, 2, 128), (9999, 8, 512)]:
        p = build("qsgd", bits=bits, bucket_size=d).compress(torch.randn(n))
        nb = -(-n // d)
        header = 16 + 8 * (1 + 6 + 4)
        assert p.nbytes == header + _pad8(4 * nb) + _pad8(nb * d * bits // 8)  # last bucket padded
        assert p.nbytes == p.to_bytes().numel()
    p = build("qsgd", bits=4).compress(torch.randn(1 << 20))
    assert abs(p.nbytes * 8 / (1 << 20) - 4.0625) < 0.001  # bits + 32/d


def test_elias_is_small_for_sparse_levels():
    g = torch.randn(1 << 16, generator=_gen(6))
    dense = build("qsgd", bits=2, norm="l2").compress(g).nbytes
    elias = build("qsgd", bits=2, norm="l2", coding="elias").compress(g).nbytes
    assert elias < dense / 2.5


def test_small_tensors_travel_raw():
    c = build("qsgd", min_numel=100)
    g = torch.randn(99, generator=_gen(7))
    p = c.compress(g)
    assert p.meta[0] == 0 and torch.equal(c.decompress(Payload.from_bytes(p.to_bytes())), g)
    assert c.step == 1
    assert build("qsgd").min_numel == 1024
    p = build("qsgd", min_numel=0).compress(torch.randn(5))
    assert p.meta[0] == 1


def test_reproducible_per_seed_rank_stream_step():
    g = torch.randn(4096, generator=_gen(8))

    def first_two(**kw):
        c = build("qsgd", bits=2, **kw)
        return [c.compress(g).to_bytes() for _ in range(2)]

    a = first_two(seed=1, rank=0, stream=0)
    assert all(torch.equal(x, y) for x, y in zip(a, first_two(seed=1, rank=0, stream=0)))
    assert not torch.equal(a[0], a[1])  # the step advances
    for other in (dict(seed=2, rank=0, stream=0), dict(seed=1, rank=1, stream=0), dict(seed=1, rank=0, stream=1)):
        assert not torch.equal(a[0], first_two(**other)[0])


def test_state_dict_resume():
    g = torch.randn(3000, generator=_gen(9))
    c = build("qsgd", seed=4)
    c.compress(g)
    state = c.state_dict()
    want = [c.compress(g).to_bytes() for _ in range(2)]
    d = build("qsgd", seed=4)
    d.load_state_dict(state)
    got = [d.compress(g).to_bytes() for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(want, got))


@pytest.mark.parametrize("coding", ["dense", "elias"])
@pytest.mark.parametrize("numel", [2048, 2000, 100])  # whole buckets, a partial last one, raw
def test_non_finite_input_raises_and_leaves_the_stream_as_it_was(coding, numel):
    assert build("qsgd").rejects_nonfinite  # the exchange relies on it (no pre-pass of its own)
    good = torch.randn(numel)
    want = build("qsgd", coding=coding, seed=3).compress(good).to_bytes()
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = good.clone()
        g[numel - 7] = bad
        c = build("qsgd", coding=coding, seed=3)
        with pytest.raises(NonFiniteInput, match="non-finite"):
            c.compress(g)
        # the failed call did not happen: the next one draws what a fresh stream's first would
        assert c.step == 0 and torch.equal(c.compress(good).to_bytes(), want)
        if numel >= 2000:  # the shared-scale path's agreement refuses it too, drawing nothing
            c = build("qsgd", coding=coding, seed=3)
            with pytest.raises(NonFiniteInput, match="non-finite"):
                c.agreement(g, 0, 2)
            assert c.step == 0 and torch.equal(c.compress(good).to_bytes(), want)


@pytest.mark.parametrize("bits,d", [(2, 32), (4, 64), (8, 16)])
def test_dense_wire_layout_is_little_endian_words(bits, d):
    """The dense format, pinned: word j of a bucket holds values j, j + q, ... (q = d*bits/32)
    from its low bits up, ``sign*level + s`` each; the words travel little-endian. Values at
    +-scale and 0 have deterministic levels (s and 0), so the codes are known exactly."""
    s, per = (1 << (bits - 1)) - 1, 32 // bits
    q = d // per
    signs = torch.randint(-1, 2, (3 * d,), generator=_gen(4)).float()
    signs[::d] = 1.0  # every bucket's scale is 1
    p = build("qsgd", bits=bits, bucket_size=d, min_numel=0).compress(signs)
    codes = (signs * s + s).long().view(3, per, q)  # value t*q + j of bucket b at (b, t, j)
    want = sum(codes[:, t, :] << (bits * t) for t in range(per)).view(-1)  # unsigned 32-bit words
    assert p.parts[1].dtype == torch.int32
    assert torch.equal(p.parts[1].long() & 0xFFFFFFFF, want)
    raw = p.parts[1].view(torch.uint8).view(-1, 4).long()  # the bytes that travel
    assert torch.equal(sum(raw[:, k] << (8 * k) for k in range(4)), want)
    assert torch.equal(build("qsgd", bits=bits, bucket_size=d).decompress(p), signs)


def test_bad_options():
    for kw in (dict(bits=3), dict(bucket_size=100), dict(norm="l1"), dict(coding="huffman"), dict(backend="jit")):
        with pytest.raises(ValueError):
            build("qsgd", **kw)
    with pytest.raises(ValueError, match="of 16 at 2 bits .* got 24 at 2 bits"):
        build("qsgd", bits=2, bucket_size=24)  # 24 two-bit codes leave a 32-bit word half full
    build("qsgd", bits=4, bucket_size=24)  # three words of eight
    with pytest.raises(ValueError, match="allowed"):
        build("qsgd", levels=4)


def _allreduce(P, g_list, bits, norm="max", **kw):
    """The LinearCodec protocol for P in-process ranks: MAX of agreements, SUM of wires."""
    streams = [build("qsgd", bits=bits, norm=norm, rank=r, seed=11, **kw) for r in range(P)]
    agreements = [s.agreement(g, r, P) for r, (s, g) in enumerate(zip(streams, g_list))]
    assert all(op == "max" for _, op in agreements)
    agreed = torch.stack([a for a, _ in agreements]).amax(0)
    wires = [s.encode_sum(g, agreed, P) for s, g in zip(streams, g_list)]
    total = torch.stack(wires).sum(0, dtype=wires[0].dtype)
    means = [s.decode_sum(total, agreed, P) for s in streams]
    locals_ = [s.decode_local(w, agreed, P) for s, w in zip(streams, wires)]
    return wires, means, locals_, agreed


@pytest.mark.parametrize("P,bits,int16", [(4, 4, False), (3, 8, True), (20, 8, True), (3, 8, False)])
def test_linear_path_matches_mean(P, bits, int16):
    g_list = [torch.randn(3000, generator=_gen(20 + r)) * (r + 1) for r in range(P)]
    wires, means, locals_, agreed = _allreduce(P, g_list, bits, wire_int16=int16)
    s = (1 << (bits - 1)) - 1
    assert wires[0].dtype == sum_dtype(P, s, int16) and wires[0].numel() == 3000
    want = {(4, 4): torch.int8, (3, 8): torch.int16, (20, 8): torch.int16}[(P, bits)]
    assert wires[0].dtype == (want if int16 or want == torch.int8 else torch.int32)
    assert all(torch.equal(means[0], m) for m in means)  # every rank decodes the same mean
    assert torch.allclose(means[0], torch.stack(locals_).mean(0), atol=1e-5)
    true = torch.stack(g_list).mean(0)
    # each value is off by less than one level step of the shared scale, summed over ranks / P
    step = torch.repeat_interleave(agreed / s, 512)[:3000]
    assert ((means[0] - true).abs() <= step + 1e-5).all()


def test_linear_path_unbiased():
    P, N = 3, 400
    g_list = [torch.randn(1024, generator=_gen(30 + r)) for r in range(P)]
    streams = None
    acc = torch.zeros(1024, dtype=torch.float64)
    streams = [build("qsgd", bits=2, rank=r, seed=12) for r in range(P)]
    for _ in range(N):
        agreed = torch.stack([s.agreement(g, r, P)[0] for r, (s, g) in enumerate(zip(streams, g_list))]).amax(0)
        total = sum(s.encode_sum(g, agreed, P).to(torch.int32) for s, g in zip(streams, g_list))
        acc += streams[0].decode_sum(total, agreed, P).double()
    true = torch.stack(g_list).mean(0).double()
    # per value variance <= P * (n/s)^2 / 4 / P^2 with s = 1
    sd = torch.repeat_interleave(agreed.double(), 512)[:1024] / 2 / math.sqrt(P * N)
    assert ((acc / N - true).abs() / sd).max() < 6


def test_linear_path_small_tensor_is_exact():
    P = 2
    g_list = [torch.randn(10, generator=_gen(40 + r)) for r in range(P)]
    streams = [build("qsgd", rank=r) for r in range(P)]
    assert streams[0].agreement(g_list[0], 0, P) is None
    total = sum(s.encode_sum(g, None, P) for s, g in zip(streams, g_list))
    assert torch.allclose(streams[0].decode_sum(total, None, P), (g_list[0] + g_list[1]) / 2)


def test_omega_codes_known_values():
    # Elias-omega: 1 -> 0, 2 -> 10 0, 4 -> 10 100 0, 17 -> 10 100 10001 0
    codes, lens = omega_codes(torch.tensor([1, 2, 3, 4, 17, 100]))
    as_str = [format(int(c), f"0{int(l)}b") for c, l in zip(codes, lens)]
    assert as_str == ["0", "100", "110", "101000", "10100100010", "1011011001000"]
    vals = torch.randint(1, 1 << 39, (500,), generator=_gen(41))
    vals[:100] = torch.randint(1, 20, (100,), generator=_gen(42))
    data, nbits = write_bits(*omega_codes(vals))
    out, used = omega_decode(data, nbits, 500)
    assert torch.equal(out, vals) and used == nbits


def test_malformed_qsgd_payloads():
    g = torch.randn(4096, generator=_gen(50))
    c = build("qsgd", bits=4)
    p = c.compress(g)
    # packed part shorter than the shape needs (header consistent, sizes lie)
    short = Payload(p.codec, p.shape, p.dtype, p.meta, [p.parts[0], p.parts[1][:-8]])
    with pytest.raises(ValueError, match="part 1"):
        c.decompress(Payload.from_bytes(short.to_bytes()))
    # a shape that claims more values than the parts hold
    lie = Payload(p.codec, (8192,), p.dtype, p.meta, p.parts)
    with pytest.raises(ValueError):
        c.decompress(Payload.from_bytes(lie.to_bytes()))
    bad_metas = [
        (1, 3, 512, 0, 0, 0),
        (1, 4, 500, 0, 0, 0),
        (1, 4, 512, 2, 0, 0),
        (7, 4, 512, 0, 0, 0),
        (1, 4, 512, 0, 5, 0),
    ]
    for meta in bad_metas:
        with pytest.raises(ValueError):
            c.decompress(Payload.from_bytes(Payload(p.codec, p.shape, p.dtype, meta, p.parts).to_bytes()))
    nan = p.parts[0].clone()
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="scales"):
        c.decompress(Payload.from_bytes(Payload(p.codec, p.shape, p.dtype, p.meta, [nan, p.parts[1]]).to_bytes()))
    # elias streams with corrupted bits decode to an error, not a silent tensor
    c = build("qsgd", bits=2, norm="l2", coding="elias")
    e = c.compress(g)
    gen = _gen(51)
    raised = 0
    for _ in range(30):
        data = e.parts[1].clone()
        where = torch.randint(0, data.numel(), (3,), generator=gen)
        data[where] ^= torch.randint(1, 256, (3,), generator=gen, dtype=torch.uint8)
        q = Payload(e.codec, e.shape, e.dtype, e.meta, [e.parts[0], data])
        try:
            out = c.decompress(Payload.from_bytes(q.to_bytes()))
            assert out.shape == g.shape and torch.isfinite(out).all()
        except ValueError:
            raised += 1
    assert raised > 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_decompress_mean_is_the_sum_of_decodes(bits, dtype):
    # The fused mean performs the float operations of decoding each payload and adding them up
    # in order (what every rank of an allgather must agree on), bit for bit.
    x = torch.randn(3 * 512 + 77, generator=_gen(61)).to(dtype)
    c = build("qsgd", bits=bits)
    for P in (1, 2, 3):
        ps = [build("qsgd", bits=bits, rank=r).compress(x * (r + 1)) for r in range(P)]
        acc = c.decompress(ps[0]).to(torch.float64 if dtype == torch.float64 else torch.float32)
        for p in ps[1:]:
            acc = acc + c.decompress(p)
        want = (acc / P).to(dtype)
        got = c.decompress_mean(ps)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, want)
        # formed in the caller's memory (the gradient), the same bits
        out = torch.full_like(x, float("nan"))
        assert c.decompress_mean(ps, out).data_ptr() == out.data_ptr()
        assert torch.equal(out, want)
    # small tensors (raw) and mixed formats take the generic path, same result
    small = [build("qsgd", bits=bits, rank=r).compress(x[:100] * (r + 1)) for r in range(2)]
    want = ((c.decompress(small[0]).float() + c.decompress(small[1])) / 2).to(dtype)
    assert torch.equal(c.decompress_mean(small), want)
    out = torch.empty(100, dtype=dtype)
    assert torch.equal(c.decompress_mean(small, out), want) and torch.equal(out, want)


def test_decompress_mean_refuses_a_malformed_payload():
    x = torch.randn(2048, generator=_gen(62))
    c = build("qsgd", bits=4)
    good = c.compress(x)
    bad = Payload(good.codec, good.shape, good.dtype, good.meta, [good.parts[0].neg(), good.parts[1]])
    with pytest.raises(ValueError, match="scales"):
        c.decompress_mean([good, bad])
    with pytest.raises(ValueError, match="at least one"):
        c.decompress_mean([])
    # an ``out`` that cannot hold the mean is refused before anything is written
    for wrong in (torch.zeros(2047), torch.zeros(2048, dtype=torch.float64), torch.zeros(4096)[::2]):
        before = wrong.clone()
        with pytest.raises(ValueError, match="out must be a contiguous"):
            c.decompress_mean([good, good], wrong)
        assert torch.equal(wrong, before)


def test_compiled_matches_eager(monkeypatch):
    # One small compilation (about 10-20 s on 2 cores): the fused kernels must give the very
    # same bytes as the eager ones for the same key.
    monkeypatch.setenv("DIST_SOUP_COMPILE", "1")
    x = torch.randn(kernels.EAGER_BELOW + 12345, generator=_gen(60))
    a = build("qsgd", bits=4, seed=9, backend="eager")
    b = build("qsgd", bits=4, seed=9, backend="compiled")
    pa, pb = a.compress(x), b.compress(x)
    assert torch.equal(pa.to_bytes(), pb.to_bytes())
    assert torch.equal(a.decompress(pa), b.decompress(pb))
    # a payload read back from bytes (parts are views at offsets into the buffer) decodes alike
    assert torch.equal(b.decompress(Payload.from_bytes(pb.to_bytes())), a.decompress(pa))
    # a second length reuses the compiled kernels (dynamic lengths) and still matches
    y = x[: kernels.EAGER_BELOW + 4096]
    assert torch.equal(a.compress(y).to_bytes(), b.compress(y).to_bytes())
    agreed = a.agreement(x, 0, 4)[0]
    assert torch.equal(agreed, b.agreement(x, 0, 4)[0])
    assert torch.equal(a.encode_sum(x, agreed, 4), b.encode_sum(x, agreed, 4))
    # the fused mean of several payloads (the allgather's decode) gives the eager bits
    ps = [build("qsgd", bits=4, seed=9, rank=r).compress(x * (r + 1)) for r in range(3)]
    assert torch.equal(a.decompress_mean(ps), b.decompress_mean(ps))
    out = torch.empty_like(x)
    assert torch.equal(b.decompress_mean(ps, out), a.decompress_mean(ps))
    # whole buckets only (no padded tail): the mean is stored through a view of out's own shape
    w = x[: 16 * 512]
    ps = [build("qsgd", bits=4, seed=9, rank=r).compress(w * (r + 1)) for r in range(3)]
    out = torch.empty_like(w)
    assert torch.equal(b.decompress_mean(ps, out), a.decompress_mean(ps))
    assert not kernels._failed, "compilation fell back to eager"


def _scaled(x, *, k):
    return x * k + 1


def test_compiled_configurations_do_not_share_a_cache(monkeypatch):
    """Dynamo keeps at most ``recompile_limit`` graphs per code object and runs eagerly past
    it: more configurations of one kernel than that must each stay compiled."""
    monkeypatch.setenv("DIST_SOUP_COMPILE", "1")
    monkeypatch.setattr(kernels, "_cache", {})
    monkeypatch.setattr(kernels, "_failed", set())
    x = torch.arange(kernels.EAGER_BELOW + 5, dtype=torch.float32)
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # raise instead of eager
        for k in range(limit + 2):
            assert torch.equal(kernels.run(_scaled, (x,), {"k": k}, "compiled"), x * k + 1)
    assert not kernels._failed, "a configuration fell back to eager"


def _fmix_reference(h):
    """murmur3's 32-bit finaliser on a Python int (unbounded, masked: no wrap-around involved)."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x68E31DA5)):
        h = ((h ^ (h >> shift)) * mult) & 0xFFFFFFFF
    return h ^ (h >> 16)


@pytest.mark.parametrize("compiled", [False, True])
def test_uniform_is_the_unsigned_32_bit_hash(monkeypatch, compiled):
    # The kernels hash in int32 lanes (wrapping products, masked shifts); the draws must be the
    # unsigned hash's, for indices past 2**31 and keys with their top bits set, on both paths.
    monkeypatch.setenv("DIST_SOUP_COMPILE", "1")
    key = 0x7EDC_BA98_F654_3210
    index = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 7, 3 * 2**31 + 12345] * 512)
    fn = torch.compile(kernels.uniform, dynamic=False) if compiled else kernels.uniform
    got = fn(index, kernels.split_key(key))
    lo, hi = key & 0xFFFFFFFF, key >> 32
    want = [(_fmix_reference(_fmix_reference((i + lo) & 0xFFFFFFFF) ^ hi) >> 8) / 2**24 for i in index.tolist()]
    assert got.dtype == torch.float32 and got.tolist() == want


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_payload_whose_scale_is_not_finite_and_nonnegative_is_refused(bad):
    c = build("qsgd")
    p = c.compress(torch.randn(2048))
    p.parts[0][2] = bad  # a damaged (or forged) scale must not reach the decode
    for decode in (lambda: c.decompress(p), lambda: c.decompress_mean([p, p])):
        with pytest.raises(ValueError, match="scales must be finite and >= 0"):
            decode()
