"""dist_soup.comm in one process: the group of one, validation, buckets, agreement words, state."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from dist_soup.comm import Exchange, LocalTransport, make_transport
from dist_soup.comm.agreement import exchange_settings, stream_id, word
from dist_soup.comm.buckets import chunk_bounds, plan

MODES = ("allgather", "allreduce", "two_phase")


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 5, generator=g),
        "b": torch.randn(6, generator=g),
        "e": torch.empty(0, 3),
        "d": torch.randn(40, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("mode", MODES)
def test_group_of_one_encodes_and_counts_no_bytes(mode):
    ex = Exchange("fp16", mode)
    assert isinstance(ex.transport, LocalTransport)
    x = _tensors()
    means, locals_ = ex.mean_many(x, return_local=True)
    assert list(means) == list(x)
    for n, t in x.items():
        assert means[n].shape == t.shape and means[n].dtype == t.dtype
        # still compressed: fp16 rounding, the same error as with P ranks
        assert torch.equal(means[n], t.to(torch.float16).to(t.dtype)), n
        assert torch.equal(locals_[n], means[n]), n
    st = ex.stats
    assert (st.bytes_sent, st.bytes_received, st.overhead_bytes) == (0, 0, 0)
    assert st.dense_bytes == 4 * sum(t.numel() for t in x.values()) and st.calls == 1
    assert set(st.as_dict()) >= {
        "bytes_sent",
        "bytes_received",
        "dense_bytes",
        "encode_s",
        "comm_s",
        "decode_s",
        "calls",
    }


def test_identity_is_exact_and_single_tensor_call():
    x = torch.randn(3, 4)
    for mode in MODES:
        out = Exchange("identity", mode).mean("x", x)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_constructor_validation():
    with pytest.raises(ValueError, match="mode must be one of"):
        Exchange("identity", "ring")
    with pytest.raises(ValueError, match="unknown compressor"):
        Exchange("nope")
    with pytest.raises(ValueError, match="allgather' and 'two_phase"):
        Exchange("adacomp", "allreduce")
    with pytest.raises(ValueError, match="allgather' and 'two_phase"):
        Exchange("topk", "allreduce")
    with pytest.raises(ValueError, match="bucket_mb"):
        Exchange("identity", bucket_mb=0)
    with pytest.raises(ValueError, match="set by the exchange"):
        Exchange("identity", rank=1)
    with pytest.raises(ValueError, match=r"unknown options \['bitz'\]; allowed: bits=4"):
        Exchange("qsgd", bitz=4)
    with pytest.raises(ValueError, match="transport must be"):
        Exchange("identity", transport="carrier-pigeon")
    with pytest.raises(ValueError, match="torch.distributed"):
        Exchange("identity", transport="torch")
    assert isinstance(make_transport("local"), LocalTransport)
    # linear codecs, error feedback around them included, may all-reduce
    for codec, opts in [("qsgd", {}), ("randomk", {}), ("cltk", {}), ("fp16", {"error_feedback": True})]:
        Exchange(codec, "allreduce", **opts)


def test_input_validation():
    ex = Exchange("identity")
    with pytest.raises(TypeError, match="mapping"):
        ex.mean_many([torch.ones(2)])
    with pytest.raises(ValueError, match="names must be non-empty strings"):
        ex.mean_many({"": torch.ones(2)})
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ex.mean("a", [1.0, 2.0])
    with pytest.raises(ValueError, match="dtype torch.int64; allowed"):
        ex.mean("a", torch.ones(2, dtype=torch.int64))
    ex.mean("a", torch.ones(2))
    with pytest.raises(ValueError, match=r"'a' has shape \(3,\).*built for shape \(2,\)"):
        ex.mean("a", torch.ones(3))
    with pytest.raises(ValueError, match="'a'.*dtype"):
        ex.mean("a", torch.ones(2, dtype=torch.float64))


def test_non_finite_input_raises_before_any_residue_changes():
    for mode in ("allgather", "two_phase"):
        ex = Exchange("topk", mode, ratio=0.25)
        x = {"a": torch.randn(16), "b": torch.randn(8)}
        ex.mean_many(x)
        before = ex.state_dict()
        bad = dict(x, b=x["b"].clone())
        bad["b"][2] = float("inf")
        with pytest.raises(ValueError, match="'b' holds non-finite"):
            ex.mean_many(bad)
        after = ex.state_dict()
        for k, s in before["streams"].items():
            for f, v in s.items():
                w = after["streams"][k][f]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (mode, k, f)
    # a huge but finite tensor (its sum overflows fp32) is accepted
    out = Exchange("identity").mean("big", torch.full((4,), 3e38))
    assert torch.isfinite(out).all()


def test_async_handle_and_in_flight_guard():
    ex = Exchange("identity", "two_phase", bucket_mb=1e-4)
    x = _tensors()
    h = ex.mean_many_async(x, return_local=True)
    with pytest.raises(ValueError, match="in flight"):
        ex.mean("w", x["w"])
    means, locals_ = h.wait()
    assert all(torch.equal(means[n], x[n].float().to(x[n].dtype)) for n in ("w", "b"))
    assert h.wait()[0] is means
    ex.mean("w", x["w"])  # free again


def test_buckets_group_by_dtype_keep_order_and_cap_size():
    specs = [
        ("a", (100,), torch.float32, "cpu"),
        ("h", (10,), torch.float16, "cpu"),
        ("b", (200,), torch.float32, "cpu"),
        ("c", (1000,), torch.float32, "cpu"),
        ("d", (50,), torch.float32, "cpu"),
    ]
    buckets = plan(specs, 1200)  # bytes
    assert [b.names for b in buckets] == [["a", "b"], ["c"], ["d"], ["h"]]
    assert [b.numel for b in buckets] == [300, 1000, 50, 10]
    assert [e.offset for e in buckets[0].entries] == [0, 100]
    assert buckets[3].dtype == torch.float16
    assert len({b.key for b in buckets}) == 4
    assert plan(specs, 1200)[0].key == buckets[0].key  # stable


def test_chunk_bounds_cover_everything():
    for n, p in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        b = chunk_bounds(n, p)
        assert len(b) == p and sum(c for _, c in b) == n
        assert all(o2 == o1 + c1 for (o1, c1), (o2, _) in zip(b, b[1:]))
        assert max(c for _, c in b) - min(c for _, c in b) <= 1


def test_words_and_stream_ids_are_stable_across_processes():
    assert word("abc") == int.from_bytes(hashlib.blake2b(b"abc", digest_size=8).digest(), "little") & ((1 << 62) - 1)
    # a pure function of the name's bytes (unlike hash(), which PYTHONHASHSEED salts per process)
    digest = hashlib.blake2b(b"layer.weight", digest_size=8).digest()
    assert stream_id("layer.weight") == int.from_bytes(digest, "little") >> 1
    assert 0 <= stream_id("x") < 2**63 and stream_id("x") != stream_id("y")


def test_settings_words_tell_settings_apart():
    a = exchange_settings("qsgd", {"bits": 4}, 0, "allgather", 2, 25.0)
    b = exchange_settings("qsgd", {"bits": 8}, 0, "allgather", 2, 25.0)
    diff = [x.label for x, y in zip(a, b) if x.word != y.word]
    assert diff == ["codec option 'bits'"]
    c = exchange_settings("qsgd", {"bits": 4}, 0, "two_phase", 2, 25.0)
    assert [x.label for x, y in zip(a, c) if x.word != y.word] == ["mode"]
    assert len(a) == len(exchange_settings("identity", {}, 0, "allgather", 2, 25.0))  # fixed count


def test_streams_are_built_with_seed_rank_and_stable_stream_id():
    ex = Exchange("randomk", seed=7, ratio=0.5)
    ex.mean("layer", torch.randn(10))
    s = ex._streams["layer"]
    assert (s.seed, s.rank, s.stream) == (7, 0, stream_id("layer"))


@pytest.mark.parametrize(
    "mode,codec,opts",
    [
        ("allgather", "topk", {"ratio": 0.2}),
        ("allreduce", "qsgd", {"min_numel": 0}),
        ("two_phase", "fp16", {"error_feedback": True}),
    ],
)
def test_state_dict_round_trip(mode, codec, opts):
    g = torch.Generator().manual_seed(1)
    xs = [{"a": torch.randn(50, generator=g), "b": torch.randn(5, 5, generator=g)} for _ in range(3)]
    a = Exchange(codec, mode, seed=2, **opts)
    a.mean_many(xs[0])
    a.mean_many(xs[1])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    b = Exchange(codec, mode, seed=2, **opts)
    b.load_state_dict(sd)
    ra, rb = a.mean_many(xs[2]), b.mean_many(xs[2])
    assert all(torch.equal(ra[n], rb[n]) for n in ra)
    if mode == "two_phase":
        assert sd["server"]
    with pytest.raises(ValueError, match="state_dict"):
        b.load_state_dict({"streams": {}})


def test_pieces_cut_and_plan_solo():
    from dist_soup.comm.buckets import pieces

    assert pieces("x", 100, 4, None) == [] and pieces("x", 100, 4, 400) == []
    cut = pieces("x", 1000, 4, 1048)  # 4000 bytes -> 4 pieces of 250 values
    assert [p for p, _, _ in cut] == ["x#0", "x#1", "x#2", "x#3"]
    assert [(o, n) for _, o, n in cut] == [(0, 250), (250, 250), (500, 250), (750, 250)]
    assert pieces("x", 3, 8, 1) == [("x#0", 0, 1), ("x#1", 1, 1), ("x#2", 2, 1)]  # at least 1 value each
    specs = [
        ("a", (10,), torch.float32, "cpu"),
        ("x#0", (20,), torch.float32, "cpu"),
        ("x#1", (20,), torch.float32, "cpu"),
        ("b", (5,), torch.float32, "cpu"),
    ]
    # pieces never share a bucket, even when the bucket could hold them all
    assert [b.names for b in plan(specs, 10**6, solo={"x#0", "x#1"})] == [["a"], ["x#0"], ["x#1"], ["b"]]
    assert [b.names for b in plan(specs, 10**6)] == [["a", "x#0", "x#1", "b"]]


@pytest.mark.parametrize("mode", MODES)
def test_pieces_equal_whole_tensors_and_keep_their_residues(mode):
    """fp16 with error feedback is element-wise, so pieces must give bit-identical means and
    locals; each piece is a stream whose residue persists across calls and through state_dict."""
    g = torch.Generator().manual_seed(3)
    xs = [
        {
            "w": torch.randn(30, 20, generator=g),
            "b": torch.randn(7, generator=g),
            "d": torch.randn(500, generator=g, dtype=torch.float64),
        }
        for _ in range(3)
    ]
    cut = Exchange("fp16", mode, chunk_mb=0.001, error_feedback=True)
    whole = Exchange("fp16", mode, chunk_mb=None, error_feedback=True)
    assert whole.chunk_mb is None and Exchange("fp16", chunk_mb=0).chunk_mb is None
    for x in xs[:2]:
        mc, lc = cut.mean_many(x, return_local=True)
        mw, lw = whole.mean_many(x, return_local=True)
        for n in x:
            assert mc[n].shape == x[n].shape and mc[n].dtype == x[n].dtype
            assert torch.equal(mc[n], mw[n]) and torch.equal(lc[n], lw[n]), (mode, n)
    sd = cut.state_dict()
    if mode != "two_phase":  # two_phase streams belong to the pieces' buckets (chunk j of P)
        assert {"b", "w#0", "w#2", "d#3"} <= set(sd["streams"]) and "w" not in sd["streams"]
        # the residues of the pieces are the residue of the whole tensor, cut
        res = torch.cat([sd["streams"][f"w#{j}"]["residue"] for j in range(3)])
        assert torch.equal(res, whole.state_dict()["streams"]["w"]["residue"].reshape(-1))
    buf = io.BytesIO()
    torch.save(sd, buf)
    again = Exchange("fp16", mode, chunk_mb=0.001, error_feedback=True)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    ra, rb = cut.mean_many(xs[2]), again.mean_many(xs[2])
    fresh = Exchange("fp16", mode, chunk_mb=0.001, error_feedback=True).mean_many(xs[2])
    assert all(torch.equal(ra[n], rb[n]) for n in ra)
    assert any(not torch.equal(ra[n], fresh[n]) for n in ra)  # the residues mattered


def test_piece_names_and_chunk_mb_validation():
    with pytest.raises(ValueError, match="chunk_mb"):
        Exchange("identity", chunk_mb=-1)
    with pytest.raises(ValueError, match="chunk_mb"):
        Exchange("identity", chunk_mb=float("inf"))
    with pytest.raises(ValueError, match="chunk_mb"):
        Exchange("identity", chunk_mb=True)
    ex = Exchange("fp16", chunk_mb=0.001)
    with pytest.raises(ValueError, match="piece"):
        ex.mean_many({"x": torch.randn(1000), "x#0": torch.randn(3)})
    ex.mean("y", torch.randn(1000))  # streams y#0..y#3 of 250 values
    with pytest.raises(ValueError, match="y#1"):
        ex.mean("y#1", torch.randn(4))
    a = exchange_settings("qsgd", {}, 0, "allgather", 2, 25.0, 4.0)
    b = exchange_settings("qsgd", {}, 0, "allgather", 2, 25.0, None)
    assert [x.label for x, y in zip(a, b) if x.word != y.word] == ["chunk_mb"]


@pytest.mark.parametrize("mode", MODES)
def test_out_receives_the_means(mode):
    g = torch.Generator().manual_seed(4)
    x = {"w": torch.randn(30, 20, generator=g), "b": torch.randn(7, generator=g), "e": torch.empty(0)}
    want = Exchange("fp16", mode, chunk_mb=0.001).mean_many(x)
    dst = {n: torch.zeros_like(t) for n, t in x.items()}
    got = Exchange("fp16", mode, chunk_mb=0.001).mean_many(x, out=dst)
    assert all(got[n] is dst[n] and torch.equal(dst[n], want[n]) for n in x)
    ex = Exchange("identity", mode, chunk_mb=0.001)
    same = {"w": x["w"].clone()}
    assert torch.equal(ex.mean_many(same, out=same)["w"], x["w"])  # in place on the input
    with pytest.raises(ValueError, match="shape"):
        ex.mean_many(x, out={"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="not one of the tensors"):
        ex.mean_many(x, out={"zz": torch.zeros(3)})
    with pytest.raises(TypeError, match="mapping"):
        ex.mean_many(x, out=[torch.zeros(3)])


@pytest.mark.parametrize("mode", MODES)
def test_local_out_receives_the_local_decodes(mode):
    g = torch.Generator().manual_seed(5)
    x = {"w": torch.randn(30, 20, generator=g), "b": torch.randn(7, generator=g), "e": torch.empty(0)}
    want_means, want_locals = Exchange("fp16", mode, chunk_mb=0.001).mean_many(x, return_local=True)
    # w travels in pieces, b whole, e not at all; the local decodes land where the caller says
    dst = {n: torch.full_like(t, 3.0) for n, t in x.items()}
    means, locals_ = Exchange("fp16", mode, chunk_mb=0.001).mean_many(x, return_local=True, local_out=dst)
    for n in x:
        assert locals_[n] is dst[n] and torch.equal(dst[n], want_locals[n]), n
        assert torch.equal(means[n], want_means[n]), n
    for codec in ("identity", "fp16"):  # identity in a group of one travels nowhere (the passthrough)
        ex = Exchange(codec, mode)
        inp = {"w": x["w"].clone()}
        _, loc = ex.mean_many(inp, out=inp, return_local=True, local_out={"w": torch.zeros_like(x["w"])})
        assert torch.equal(loc["w"], ex.mean_many(x, return_local=True)[1]["w"])
    with pytest.raises(ValueError, match="return_local=True"):
        ex.mean_many(x, local_out={"w": torch.zeros_like(x["w"])})
    with pytest.raises(ValueError, match=r"local_out\['w'\] must be a tensor of shape"):
        ex.mean_many(x, return_local=True, local_out={"w": torch.zeros(3)})
