"""The wire format for every codec: exact sizes, byte round trips, and malformed buffers
(truncated, random, wrong magic/version, lying sizes) refused with ValueError, quickly: by
Payload.from_bytes (structure) or by the codec's decompress before it decodes (fields).
Ends with a hypothesis fuzz of reading and decoding."""

import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_soup.compress import Payload, build, names
from dist_soup.compress.payload import CODEC_IDS, codec_name_of

CODECS = [
    ("identity", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("qsgd", dict(bits=4)),
    ("qsgd", dict(bits=2, coding="elias")),
    ("qsgd", dict(bits=8, min_numel=10_000)),  # raw
    ("adacomp", {}),
    ("adacomp", dict(values="fp16")),
    ("topk", dict(ratio=0.05)),
    ("randomk", dict(ratio=0.05)),
    ("cltk", dict(ratio=0.05)),
    ("qsgd", dict(bits=4, error_feedback=True)),
]


def _payloads():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(24, 8, 3, 3, generator=gen)
    out = []
    for name, opts in CODECS:
        c = build(name, **opts)
        for _ in range(2):
            p = c.compress(g)
        out.append((name, opts, c, g, p))
    return out


PAYLOADS = _payloads()


def test_every_registered_codec_is_covered():
    assert {n for n, _ in CODECS} == set(names()) == set(CODEC_IDS)


@pytest.mark.parametrize("case", PAYLOADS, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(PAYLOADS)])
def test_round_trip_and_exact_size(case):
    name, opts, c, g, p = case
    buf = p.to_bytes()
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() == p.nbytes
    out = torch.empty(p.nbytes, dtype=torch.uint8)
    p.write_into(out)
    assert torch.equal(out, buf)
    q = Payload.from_bytes(buf)
    assert codec_name_of(q.codec) == name and q.shape == p.shape and q.meta == p.meta
    d = c.decompress(q)
    assert d.shape == g.shape and d.dtype == g.dtype
    assert torch.equal(d, c.decompress(p))
    # bytes objects and an unaligned copy read back the same
    assert torch.equal(c.decompress(Payload.from_bytes(bytes(buf.tolist()))), d)
    unaligned = torch.empty(p.nbytes + 1, dtype=torch.uint8)[1:]
    unaligned.copy_(buf)
    assert torch.equal(c.decompress(Payload.from_bytes(unaligned)), d)
    if name == "identity":
        assert torch.equal(d, g)


def _read_and_decode(buf):
    p = Payload.from_bytes(buf)
    return build(codec_name_of(p.codec)).decompress(p)


def _raises_fast(buf, match=None):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        _read_and_decode(buf)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("case", PAYLOADS, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(PAYLOADS)])
def test_truncated_and_extended(case):
    *_, p = case
    buf = p.to_bytes()
    cuts = sorted({0, 1, 15, 16, 17, 40, buf.numel() // 2, buf.numel() - 8, buf.numel() - 1})
    for n in cuts:
        if 0 <= n < buf.numel():
            _raises_fast(buf[:n].clone())
    _raises_fast(torch.cat([buf, torch.zeros(8, dtype=torch.uint8)]), "length mismatch")


def test_header_fields_checked():
    p = PAYLOADS[3][-1]  # qsgd
    buf = p.to_bytes()

    def patched(offset, value_bytes):
        b = buf.clone()
        b[offset : offset + len(value_bytes)] = torch.tensor(list(value_bytes), dtype=torch.uint8)
        return b

    _raises_fast(patched(0, b"XSUP"), "magic")
    _raises_fast(patched(4, b"\x02"), "version")
    _raises_fast(patched(5, b"\xee"), "codec id")
    _raises_fast(patched(6, b"\x63"), "dtype code")
    _raises_fast(patched(7, b"\x09"), "out of range")
    _raises_fast(patched(12, b"\x01"), "reserved")
    ndim = len(p.shape)
    # shape that lies: claims more values than the parts hold
    _raises_fast(patched(16, struct.pack("<q", p.shape[0] * 2)))
    _raises_fast(patched(16, struct.pack("<q", -3)), "shape")
    # a part declaring a huge numel: refused before any allocation
    part0 = 16 + 8 * (ndim + len(p.meta))
    _raises_fast(patched(part0 + 8, struct.pack("<q", 1 << 39)), "truncated")
    _raises_fast(patched(part0, struct.pack("<q", 77)), "dtype code")


def test_random_bytes():
    gen = torch.Generator().manual_seed(1)
    for n in (0, 3, 16, 64, 300):
        for _ in range(20):
            _raises_fast(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8))


def _decode_or_refuse(buf):
    """Either a clean ValueError, or a payload that decodes to its declared shape."""
    try:
        p = Payload.from_bytes(buf)
    except ValueError:
        return "refused"
    name = codec_name_of(p.codec)
    c = build(name)
    try:
        out = c.decompress(p)
    except ValueError:
        return "refused late"
    assert tuple(out.shape) == p.shape and out.dtype == p.dtype
    return "decoded"


@settings(max_examples=150, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=400))
def test_fuzz_random_buffers(data):
    _decode_or_refuse(data)


@settings(max_examples=250, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(PAYLOADS) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 3),
)
def test_fuzz_mutated_payloads(which, flips, cut):
    buf = PAYLOADS[which][-1].to_bytes().clone()
    for pos, x in flips:
        buf[pos % buf.numel()] ^= x
    if cut:
        buf = buf[: buf.numel() - 8 * cut] if cut < 3 else buf[: buf.numel() // 2]
    _decode_or_refuse(buf)


@pytest.mark.parametrize("name,opts", CODECS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CODECS)])
def test_state_dict_survives_save_load_and_resumes(name, opts, tmp_path):
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(24, 8, 3, 3, generator=gen) for _ in range(4)]
    a = build(name, seed=5, **opts)
    for g in gs[:2]:
        a.compress(g)
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)
    b = build(name, seed=5, **opts)
    b.load_state_dict(torch.load(path, weights_only=True))
    for g in gs[2:]:
        assert torch.equal(a.compress(g).to_bytes(), b.compress(g).to_bytes())
