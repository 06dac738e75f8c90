"""dist_soup.comm across real processes: torch.multiprocessing spawn, gloo on 127.0.0.1.

Each test function spawns one group and runs several checks in it (spawning costs seconds on
this 2-core machine). Workers assert themselves; a failing assertion on any rank fails the test
through ``tests.dist_utils.run_ranks``. The gloo timeout is short so a hang would surface as an error, not a stall.
"""

from __future__ import annotations

import io
import itertools
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from dist_soup.comm import DecodeError, Exchange, NonFiniteError, TorchTransport
from dist_soup.compress import build

from .dist_utils import run_ranks as spawn

MODES = ("allgather", "allreduce", "two_phase")


def rank_tensors(rank: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Values on a 1/8 grid: every sum is exact in fp32 whatever the order of addition."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return {n: torch.randint(-400, 400, s, generator=g).float() / 8 for n, s in shapes.items()}


def exact_mean(world_size: int, shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    per_rank = [rank_tensors(r, shapes, seed) for r in range(world_size)]
    return {n: sum(t[n] for t in per_rank) / world_size for n in shapes}


def same_on_all_ranks(tensors: dict[str, torch.Tensor]) -> bool:
    """Bit-for-bit comparison of this rank's results with every other rank's."""
    bits = torch.cat([t.detach().reshape(-1).to(torch.float32).view(torch.int32) for t in tensors.values()])
    gathered = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, bits)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def identity_nbytes(shape) -> int:
    return build("identity").compress(torch.zeros(shape)).nbytes


# --------------------------------------------------------------------------------------------
SHAPES = {"w1": (7, 5), "b1": (7,), "w2": (300,), "big": (64, 33)}


def _worker_modes(rank: int, P: int) -> None:
    mine = rank_tensors(rank, SHAPES)
    exact = exact_mean(P, SHAPES)
    numel = {n: torch.Size(s).numel() for n, s in SHAPES.items()}
    total = sum(numel.values())
    for mode in MODES:
        # identity: the exact mean, bit-identical everywhere, locals are this rank's inputs
        ex = Exchange("identity", mode)
        means, locals_ = ex.mean_many(mine, return_local=True)
        for n in SHAPES:
            assert means[n].shape == mine[n].shape and means[n].dtype == torch.float32
            assert torch.equal(means[n], exact[n]), (mode, n)
            assert torch.equal(locals_[n], mine[n]), (mode, n)
        assert same_on_all_ranks(means)
        st = ex.stats
        assert st.calls == 1 and st.dense_bytes == 4 * total
        if mode == "allgather":
            own = sum(identity_nbytes(s) for s in SHAPES.values())
            assert (st.bytes_sent, st.bytes_received) == (own, (P - 1) * own), st
            assert st.collectives == 2  # control, payloads: one bucket (fixed-size: no size exchange)
        elif mode == "allreduce":
            assert (st.bytes_sent, st.bytes_received) == (4 * total, 4 * total), st
            assert st.collectives == 2  # control, one fused SUM
        else:
            chunks = [total // P + (1 if j < total % P else 0) for j in range(P)]
            nb = [identity_nbytes((c,)) for c in chunks]
            sent = sum(nb) - nb[rank] + nb[rank]  # phase 1 to others, phase 2 own server chunk
            received = (P - 1) * nb[rank] + sum(nb) - nb[rank]
            assert (st.bytes_sent, st.bytes_received) == (sent, received), st
            assert st.collectives == 5  # control, sizes, a2a, sizes, gather
        # single tensor, stats accumulate, reset works
        one = ex.mean("w2", mine["w2"])
        assert torch.equal(one, exact["w2"]) and ex.stats.calls == 2
        ex.stats.reset()
        assert ex.stats.as_dict()["bytes_sent"] == 0 and ex.stats.calls == 0

        # fp16 / bf16: within the cast's rounding, identical on all ranks, fp16 halves the bytes
        for codec, tol in (("fp16", 1e-3), ("bf16", 8e-3)):
            ex = Exchange(codec, mode)
            means = ex.mean_many(mine)
            for n in SHAPES:
                scale = exact[n].abs().max().item() + 1
                assert (means[n] - exact[n]).abs().max().item() <= tol * scale, (mode, codec, n)
            assert same_on_all_ranks(means)
            assert ex.stats.bytes_sent < 0.55 * 4 * total + 400, (mode, codec, ex.stats)

        # half-precision inputs keep their dtype
        half = {n: t.to(torch.bfloat16) for n, t in mine.items()}
        means = Exchange("identity", mode).mean_many(half)
        for n in SHAPES:
            want = sum(rank_tensors(r, SHAPES)[n].to(torch.bfloat16).float() for r in range(P)) / P
            assert means[n].dtype == torch.bfloat16
            assert (means[n].float() - want).abs().max() <= want.abs().max() / 128, (mode, n)

        # async: launch, compute meanwhile, then wait; a stream in flight refuses a second call
        ex = Exchange("identity", mode, bucket_mb=0.004)
        handle = ex.mean_many_async(mine, return_local=True)
        busy = torch.randn(200, 200) @ torch.randn(200, 200)
        with pytest.raises(ValueError, match="in flight"):
            ex.mean("w1", mine["w1"])
        means, locals_ = handle.wait()
        assert busy.shape == (200, 200)
        assert all(torch.equal(means[n], exact[n]) for n in SHAPES)
        assert handle.wait()[0] is means  # the result is kept
        assert torch.equal(ex.mean("w1", mine["w1"]), exact["w1"])

    # the transport's plain primitives (the engine's Gram sums and lambda broadcast use them)
    tr = Exchange("identity").transport
    assert isinstance(tr, TorchTransport) and (tr.rank, tr.world_size) == (rank, P)
    assert tr.all_reduce_(torch.tensor([rank, -rank], dtype=torch.int16), "max").tolist() == [P - 1, 0]
    assert tr.all_reduce_(torch.full((2,), rank + 1.0)).tolist() == [P * (P + 1) / 2] * 2
    assert tr.broadcast_(torch.full((3,), float(rank)), P - 1).tolist() == [P - 1.0] * 3
    assert [t.tolist() for t in tr.all_gather_v(torch.full((2,), rank), [2] * P)] == [[r, r] for r in range(P)]
    pieces = tr.all_to_all_v(torch.arange(P) + 10 * rank, [1] * P, [1] * P)
    assert [t.item() for t in pieces] == [rank + 10 * r for r in range(P)]
    tr.barrier()
    # a sub-group: group ranks differ from global ranks, the others take no part
    if P > 2:
        members = list(range(1, P))
        sub = dist.new_group(members)
        if rank in members:
            sub_exact = {n: sum(rank_tensors(r, SHAPES)[n] for r in members) / len(members) for n in SHAPES}
            for mode in MODES:
                ex = Exchange("identity", mode, group=sub)
                assert (ex.transport.rank, ex.transport.world_size) == (rank - 1, P - 1)
                means = ex.mean_many(mine)
                assert all(torch.equal(means[n], sub_exact[n]) for n in SHAPES), mode
            got = ex.transport.broadcast_(torch.full((2,), float(rank)), 0)  # group rank 0 = rank 1
            assert got.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("world_size", [2, 4])
def test_modes_identity_cast_bytes_async(world_size):
    spawn(_worker_modes, world_size)


# --------------------------------------------------------------------------------------------
def _worker_bucketing_state(rank: int, P: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )
    g = torch.Generator().manual_seed(rank)
    grads = {n: torch.randint(-64, 64, p.shape, generator=g).float() / 8 for n, p in model.named_parameters()}
    everyone = [dict() for _ in range(P)]
    for r in range(P):
        gr = torch.Generator().manual_seed(r)
        everyone[r] = {
            n: torch.randint(-64, 64, p.shape, generator=gr).float() / 8 for n, p in model.named_parameters()
        }
    exact = {n: sum(e[n] for e in everyone) / P for n in grads}
    assert len(grads) == 10
    for mode in MODES:
        ex = Exchange("identity", mode)  # default 25 MB: the whole model is one bucket
        means = ex.mean_many(grads)
        assert all(torch.equal(means[n], exact[n]) for n in grads), mode
        per_bucket = {"allgather": 1, "allreduce": 1, "two_phase": 4}[mode]  # identity: fixed size
        assert ex.stats.collectives == 1 + per_bucket, (mode, ex.stats)
        # small buckets: more collectives, same result
        ex = Exchange("identity", mode, bucket_mb=0.01)
        means = ex.mean_many(grads)
        assert all(torch.equal(means[n], exact[n]) for n in grads), mode
        from dist_soup.comm.buckets import plan

        nb = len(plan([(n, tuple(t.shape), t.dtype, t.device) for n, t in grads.items()], int(0.01 * 2**20)))
        assert 1 < nb < len(grads)
        assert ex.stats.collectives == 1 + per_bucket * nb, (mode, nb, ex.stats)

    # state_dict round trip through torch.save / torch.load(weights_only=True): a copy resumed
    # from the saved state continues exactly like the original
    cases = [
        ("allgather", "topk", {"ratio": 0.1}),
        ("allreduce", "cltk", {"ratio": 0.1, "beta": 0.5}),
        ("allreduce", "fp16", {"error_feedback": True}),
        ("two_phase", "adacomp", {}),
    ]
    gs = torch.Generator().manual_seed(50 + rank)
    grads = {n: torch.randn(t.shape, generator=gs) for n, t in grads.items()}  # off-grid values
    for mode, codec, opts in cases:
        a = Exchange(codec, mode, seed=3, **opts)
        for step in range(2):
            a.mean_many({n: t * (step + 1) for n, t in grads.items()})
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        if mode == "two_phase":
            assert sd["server"], "two_phase keeps server residues"
        b = Exchange(codec, mode, seed=3, **opts)
        b.load_state_dict(sd)
        ra = a.mean_many(grads)
        rb = b.mean_many(grads)
        assert all(torch.equal(ra[n], rb[n]) for n in grads), (mode, codec)
        fresh = Exchange(codec, mode, seed=3, **opts).mean_many(grads)
        assert any(not torch.equal(ra[n], fresh[n]) for n in grads), (mode, codec, "state had no effect")


def test_bucketing_of_a_model_and_state_dict():
    spawn(_worker_bucketing_state, 2)


# --------------------------------------------------------------------------------------------
def _worker_qsgd(rank: int, P: int) -> None:
    shapes = {"a": (1500,), "b": (40, 25), "c": (700,)}
    g = torch.Generator().manual_seed(100 + rank)
    mine = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    everyone = []
    for r in range(P):
        gr = torch.Generator().manual_seed(100 + r)
        everyone.append({n: torch.randn(s, generator=gr) for n, s in shapes.items()})
    exact = {n: sum(e[n] for e in everyone) / P for n in shapes}
    rounds = 60
    for mode in MODES:
        ex = Exchange("qsgd", mode, bits=4, bucket_size=64, min_numel=0, seed=11, bucket_mb=0.01)
        avg = {n: torch.zeros(s) for n, s in shapes.items()}
        first_err = None
        for t in range(rounds):
            means = ex.mean_many(mine)
            if t == 0:
                assert same_on_all_ranks(means), mode
                first_err = sum((means[n] - exact[n]).norm() ** 2 for n in shapes).sqrt().item()
                st = ex.stats
                # 4-bit packed payloads; allreduce sums int8 levels (1 byte a value) plus scales
                assert st.bytes_sent < (0.3 if mode == "allreduce" else 0.2) * st.dense_bytes, (mode, st)
            for n in shapes:
                avg[n] += means[n] / rounds
        err = sum((avg[n] - exact[n]).norm() ** 2 for n in shapes).sqrt().item()
        assert first_err > 0
        # unbiased and independent across rounds: error of the average ~ first_err / sqrt(rounds)
        assert err < 0.35 * first_err, (mode, err, first_err)

    # random-k (shared positions) sums on the wire to exactly what all-gathering it gives
    grid = rank_tensors(rank, shapes, seed=4)
    grid_exact = exact_mean(P, shapes, seed=4)
    ra = Exchange("randomk", "allreduce", ratio=0.1, seed=9).mean_many(grid)
    rg = Exchange("randomk", "allgather", ratio=0.1, seed=9).mean_many(grid)
    for n in shapes:
        assert torch.equal(ra[n], rg[n]), n
        nz = ra[n] != 0
        assert torch.equal(ra[n][nz], grid_exact[n][nz]) and nz.sum() <= round(0.1 * ra[n].numel())
    assert same_on_all_ranks(ra)
    # CLT-k: at step 0 the leader is rank 0; everyone sends its values at rank 0's top-k of |g|
    leader = rank_tensors(0, shapes, seed=4)
    ex = Exchange("cltk", "allreduce", ratio=0.05)
    out = ex.mean_many(grid)
    for n in shapes:
        k = round(0.05 * grid[n].numel())
        top = leader[n].reshape(-1).abs().topk(k).indices
        want = torch.zeros(grid[n].numel())
        want[top] = grid_exact[n].reshape(-1)[top]
        assert torch.equal(out[n].reshape(-1), want), n
    assert same_on_all_ranks(out)
    assert [s.step for s in ex._streams.values()] == [1] * len(shapes)  # leader rotates with step
    # AdaComp (residue inside the stream): sends a small fraction, and nothing is lost over time
    for mode in ("allgather", "two_phase"):
        ex = Exchange("adacomp", mode, bin_size=50)
        avg = {n: torch.zeros(s) for n, s in shapes.items()}
        for t in range(rounds):
            means = ex.mean_many(mine)
            if t == 0:
                assert same_on_all_ranks(means), mode
                first_err = sum((means[n] - exact[n]).norm() ** 2 for n in shapes).sqrt().item()
            for n in shapes:
                avg[n] += means[n] / rounds
        err = sum((avg[n] - exact[n]).norm() ** 2 for n in shapes).sqrt().item()
        assert err < 0.35 * first_err, (mode, err, first_err)
        assert ex.stats.bytes_sent < 0.2 * ex.stats.dense_bytes, (mode, ex.stats)


def test_lossy_codecs_in_every_mode():
    """QSGD means converge to the exact mean in every mode; random-k, CLT-k, AdaComp."""
    spawn(_worker_qsgd, 2)


# --------------------------------------------------------------------------------------------
def _worker_pieces(rank: int, P: int) -> None:
    """Tensors cut into pieces (chunk_mb tiny): exact identity means, locals, byte counts."""
    from dist_soup.comm.buckets import chunk_bounds

    mine = rank_tensors(rank, SHAPES)
    exact = exact_mean(P, SHAPES)
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    for mode in MODES:
        ex = Exchange("identity", mode, chunk_mb=0.001)  # 262 values a piece: big in 9, w2 in 2
        handle = ex.mean_many_async(mine, return_local=True)
        means, locals_ = handle.wait()
        whole = Exchange("identity", mode, chunk_mb=None).mean_many(mine)
        for n in SHAPES:
            assert means[n].shape == mine[n].shape and means[n].dtype == torch.float32
            assert torch.equal(means[n], exact[n]) and torch.equal(means[n], whole[n]), (mode, n)
            assert torch.equal(locals_[n], mine[n]), (mode, n)
        assert same_on_all_ranks(means)
        ((buckets, cuts),) = ex._plans.values()
        assert {n: len(c) for n, c in cuts.items()} == {"big": 9, "w2": 2}
        assert len(buckets) == 12  # w1+b1 fused, 2 pieces of w2, 9 of big
        st = ex.stats
        nb = len(buckets)
        if mode == "allgather":
            own = sum(identity_nbytes(e.shape) for b in buckets for e in b.entries)  # a payload per piece
            assert (st.bytes_sent, st.bytes_received) == (own, (P - 1) * own), st
            assert st.collectives == 1 + nb  # identity is fixed-size: no size exchange
        elif mode == "allreduce":
            assert (st.bytes_sent, st.bytes_received) == (4 * total, 4 * total), st
            assert st.collectives == 1 + nb
        else:
            sent = received = 0
            for b in buckets:
                sizes = [identity_nbytes((c,)) if c else 0 for _, c in chunk_bounds(b.numel, P)]
                sent += sum(sizes) - sizes[rank] + sizes[rank]
                received += (P - 1) * sizes[rank] + sum(sizes) - sizes[rank]
            assert (st.bytes_sent, st.bytes_received) == (sent, received), st
            assert st.collectives == 1 + 4 * nb
        # out=: the means formed in the caller's memory, here the inputs themselves; local_out=:
        # the local decodes in the caller's memory too
        for fresh, local in itertools.product((False, True), (False, True)):
            buf = {n: t.clone() for n, t in mine.items()}
            dst = {n: torch.full_like(t, 7.0) for n, t in mine.items()} if fresh else buf
            lout = {n: torch.full_like(t, 5.0) for n, t in mine.items()} if local else None
            res, loc = ex.mean_many(buf, out=dst, return_local=True, local_out=lout)
            for n in SHAPES:
                assert res[n] is dst[n] and torch.equal(dst[n], exact[n]), (mode, fresh, n)
                assert torch.equal(loc[n], mine[n]), (mode, fresh, n)  # not the mean written over it
                assert lout is None or loc[n] is lout[n], (mode, fresh, n)
        # pieces are in flight until wait(): the whole name and its pieces' names are busy
        h = ex.mean_many_async({"big": mine["big"]})
        with pytest.raises(ValueError, match="in flight"):
            ex.mean("big", mine["big"])
        assert torch.equal(h.wait()["big"], exact["big"])

    # QSGD in pieces: every rank holds the same result, and it is close to the mean
    g = torch.Generator().manual_seed(rank)
    x = {"v": torch.randn(6000, generator=g)}
    ex = Exchange("qsgd", "allgather", chunk_mb=0.005, bits=8)
    out = ex.mean_many(x)
    assert len(ex._streams) == 5 and same_on_all_ranks(out)

    # 8-bit QSGD levels summed on gloo travel as int32: one warning per exchange, naming the fixes
    ex = Exchange("qsgd", "allreduce", bits=8)
    with pytest.warns(RuntimeWarning, match="allgather.*bits=4.*wire_int16"):
        ex.mean("v", x["v"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex.mean("v", x["v"])  # once
        Exchange("qsgd", "allreduce", bits=4).mean("v", x["v"])  # int8 sums: compressed


def test_pieces_in_every_mode():
    spawn(_worker_pieces, 2)


# --------------------------------------------------------------------------------------------
def _expect_everywhere(fn, *patterns: str, bound_s: float = 10.0) -> str:
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        fn()
    took = time.monotonic() - t0
    msg = str(info.value)
    assert took < bound_s, (took, msg)
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


def _worker_mismatch(rank: int, P: int) -> None:
    x = {"a": torch.ones(10), "b": torch.ones(3, 4)}
    cases = [
        (lambda: Exchange("identity" if rank == 0 else "fp16"), x, "compressor"),
        (lambda: Exchange("qsgd", bits=4 if rank == 0 else 8), x, "codec option 'bits'"),
        (lambda: Exchange("qsgd", **({"bucket_size": 256} if rank == 0 else {})), x, "codec option"),
        (lambda: Exchange("identity", "allgather" if rank == 0 else "allreduce"), x, "mode"),
        (lambda: Exchange("identity", "two_phase" if rank == 0 else "allgather"), x, "mode"),
        (lambda: Exchange("identity", seed=rank), x, "seed"),
        (lambda: Exchange("identity", bucket_mb=1.0 + rank), x, "bucket_mb"),
        (lambda: Exchange("identity", chunk_mb=1.0 + rank), x, "chunk_mb"),
        (lambda: Exchange("fp16", chunk_mb=None if rank else 0.001), x, "chunk_mb"),
        (lambda: Exchange("identity"), {"a": x["a"], ("b" if rank == 0 else "B"): x["b"]}, "tensor #1 name"),
        (lambda: Exchange("identity"), {"a": torch.ones(10 + rank), "b": x["b"]}, "tensor #0 shape/dtype"),
        (
            lambda: Exchange("identity"),
            {"a": x["a"], "b": x["b"].double() if rank else x["b"]},
            "tensor #1 shape/dtype",
        ),
        (lambda: Exchange("identity", "two_phase"), x if rank == 0 else {"a": x["a"]}, "number of tensors"),
    ]
    for make, tensors, label in cases:
        ex = make()
        _expect_everywhere(lambda ex=ex, tensors=tensors: ex.mean_many(tensors), "differs across ranks", label)
    # an input error on one rank stops every rank before anything is encoded
    ex = Exchange("fp16", error_feedback=True)
    ex.mean("a", x["a"])
    before = ex.state_dict()["streams"]["a"]["residue"].clone()
    bad = x["a"].clone()
    if rank == 1:
        bad[3] = float("nan")
    msg = _expect_everywhere(lambda: ex.mean("a", bad), "'a'", "non-finite", "rank 1")
    assert torch.equal(ex.state_dict()["streams"]["a"]["residue"], before), msg
    wrong = x["a"].long() if rank == 0 else x["a"]
    _expect_everywhere(lambda: ex.mean("a", wrong), "dtype" if rank == 0 else "rank 0 rejected")
    # the group is still healthy: a correct call goes through on every rank
    assert torch.equal(Exchange("identity").mean("a", x["a"] * (rank + 1)), x["a"] * (P + 1) / 2)


def test_mismatched_configurations_fail_on_every_rank():
    spawn(_worker_mismatch, 2)


# --------------------------------------------------------------------------------------------
class CorruptingTransport(TorchTransport):
    """gloo, but rank ``bad`` damages the bytes it sends (only uint8 payload buffers)."""

    def __init__(self, bad: int, offset: int) -> None:
        super().__init__()
        self.bad, self.offset = bad, offset

    def _damage(self, t: torch.Tensor) -> torch.Tensor:
        if self.rank == self.bad and t.dtype == torch.uint8 and t.numel() > self.offset:
            t = t.clone()
            t[self.offset] ^= 0x5A
        return t

    def all_gather_v_async(self, t, counts):
        return super().all_gather_v_async(self._damage(t), counts)

    def all_to_all_v_async(self, t, send_counts, recv_counts):
        return super().all_to_all_v_async(self._damage(t), send_counts, recv_counts)


def _worker_corrupt(rank: int, P: int) -> None:
    x = {"a": torch.ones(10) * (rank + 1), "b": torch.ones(3, 4)}
    # allgather: everyone decodes rank 1's damaged payload and names rank 1
    for offset, what in ((0, "magic"), (16, "")):  # the magic, then the first shape word
        ex = Exchange("identity", "allgather", transport=CorruptingTransport(1, offset))
        msg = _expect_everywhere(lambda ex=ex: ex.mean_many(x), "from rank 1", "'a'", what)
        assert "failed to decode" in msg
    with pytest.raises(DecodeError) as info:
        Exchange("fp16", "allgather", transport=CorruptingTransport(0, 0)).mean_many(x)
    assert info.value.sender == 0
    # two_phase: rank 1 damages only the chunk it sends to rank 0; rank 0 names rank 1, and
    # rank 1 learns of it in the next size exchange instead of waiting forever
    ex = Exchange("identity", "two_phase", transport=CorruptingTransport(1, 0))
    if rank == 0:
        _expect_everywhere(lambda: ex.mean_many(x), "from rank 1", "failed to decode")
    else:
        _expect_everywhere(lambda: ex.mean_many(x), "rank 0 could not decode", "rank 1")
    # the group still works afterwards, also with fewer values than ranks (an empty chunk) and
    # with buckets of several dtypes
    mixed = {
        "one": torch.tensor([rank + 1.0]),
        "d": torch.full((3,), rank + 1.0, dtype=torch.float64),
        "h": torch.full((5,), rank + 1.0, dtype=torch.float16),
        "a": x["a"],
    }
    for mode in ("two_phase", "allreduce", "allgather"):
        means = Exchange("identity", mode).mean_many(mixed)
        for n, t in mixed.items():
            assert means[n].dtype == t.dtype and torch.equal(means[n], torch.full_like(t, 1.5)), (mode, n)


def test_corrupted_payloads_name_the_sender():
    spawn(_worker_corrupt, 2)


# --------------------------------------------------------------------------------------------
def _worker_agreed_layout(rank: int, P: int) -> None:
    mine = rank_tensors(rank, SHAPES)
    for codec, opts, per_bucket in (("qsgd", {"bits": 4}, 1), ("adacomp", {}, 2)):
        ex = Exchange(codec, "allgather", **opts)
        first = ex.mean_many(mine)
        n1 = ex.stats.collectives
        second = ex.mean_many(mine)
        n2 = ex.stats.collectives - n1
        # the control collective runs once per layout; fixed-size payloads skip the size exchange
        assert n1 == 1 + per_bucket and n2 == per_bucket, (codec, n1, n2)
        assert same_on_all_ranks(second) and all(s.shape == first[k].shape for k, s in second.items())
    # on the agreed layout a rank's bad input still stops every rank, with nothing changed
    ex = Exchange("fp16", error_feedback=True)
    ex.mean_many(mine)
    before = {k: v["residue"].clone() for k, v in ex.state_dict()["streams"].items()}
    bad = dict(mine)
    if rank == 1:
        bad["w1"] = bad["w1"].clone()
        bad["w1"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="'w1'.*non-finite.*rank 1"):
        ex.mean_many(bad)
    wrong = dict(mine)
    if rank == 0:
        wrong["b1"] = wrong["b1"].long()
    with pytest.raises(ValueError, match="dtype" if rank == 0 else "rank 0 rejected"):
        ex.mean_many(wrong)
    after = ex.state_dict()["streams"]
    assert all(torch.equal(after[k]["residue"], v) for k, v in before.items())
    assert same_on_all_ranks(ex.mean_many(mine))


def test_agreed_layout_needs_no_control_collective_and_still_stops_together():
    spawn(_worker_agreed_layout, 2)


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b


def _worker_nonfinite_found_in_encode(rank: int, P: int) -> None:
    # QSGD on an agreed allgather layout: the exchange makes no pass of its own over the tensors,
    # the codec finds the NaN / inf while it encodes, and that bucket's status word stops every rank.
    mine = rank_tensors(rank, {"small": (100,), "big": (64, 700)})  # raw; 4 pieces at chunk_mb 0.05
    for opts in ({"bits": 4}, {"bits": 4, "norm": "l2"}):
        ex, ref = (Exchange("qsgd", "allgather", chunk_mb=0.05, **opts) for _ in range(2))
        ex.mean_many(mine)  # the layout is agreed
        ref.mean_many(mine)
        cases = [("small", float("nan")), ("big", float("inf"))]
        if opts.get("norm") == "l2":
            cases.append(("big", 1e30))  # finite, but its bucket's 2-norm overflows to inf
        for name, value in cases:
            before = ex.state_dict()
            bad = dict(mine)
            if rank == 1:
                bad[name] = bad[name].clone()
                bad[name].view(-1)[-3] = value  # in the last piece
            _expect_everywhere(lambda ex=ex, bad=bad: ex.mean_many(bad), f"'{name}'", "non-finite", "rank 1")
            assert _same_state(ex.state_dict(), before), (opts, name, value)
        # nothing changed: the next call gives what an exchange that never saw the bad calls gives
        got, want = ex.mean_many(mine), ref.mean_many(mine)
        assert all(torch.equal(got[k], want[k]) for k in mine), opts


def test_nonfinite_found_while_encoding_stops_every_rank_with_nothing_changed():
    spawn(_worker_nonfinite_found_in_encode, 2)


# What every rank raises when rank 1's codec refuses a finite input, by mode (allgather cuts
# "big" into pieces: the refusal, in its last piece, still names the tensor).
_REFUSED = {
    "allgather": ("'big' holds non-finite.*on rank 1", {"chunk_mb": 0.05}),
    "allreduce": ("'big'.*refused its input", {}),
    "two_phase": ("rank 1's codec refused its input", {}),
}


def _worker_refused_by_codec(rank: int, P: int, mode: str) -> None:
    # QSGD's l2 scale of a finite input overflows on rank 1 (while it encodes in allgather and
    # two_phase, while it agrees on scales in allreduce), on the first call of a layout (the
    # control collective has said every input is finite) and on an agreed one: the refusal
    # travels with what the ranks exchange anyway (status words, the all-reduced scales, the
    # chunk sizes), so every rank stops at that bucket with the same error and nobody waits.
    mine = rank_tensors(rank, {"small": (100,), "big": (64, 700)})
    pattern, options = _REFUSED[mode]
    ex, ref = (Exchange("qsgd", mode, bits=4, norm="l2", **options) for _ in range(2))
    undone = mode != "two_phase"  # allgather's journal, allreduce's refusal before any encode
    for first in (True, False):
        if not first:
            got, want = ex.mean_many(mine), ref.mean_many(mine)
            assert not undone or all(torch.equal(got[k], want[k]) for k in mine)
        bad = dict(mine)
        if rank == 1:
            bad["big"] = bad["big"].clone()
            bad["big"].view(-1)[-3] = 1e30
        with pytest.raises(NonFiniteError, match=pattern):
            ex.mean_many(bad)
    got = ex.mean_many(mine)
    if undone:  # nothing changed
        want = ref.mean_many(mine)
        assert all(torch.equal(got[k], want[k]) for k in mine)
    # the ranks still agree bit for bit (two_phase: rank 1 had encoded its first chunk; the
    # engine's journal puts such streams back, a bare call leaves them advanced)
    for k, v in got.items():
        everyone = [torch.empty_like(v) for _ in range(P)]
        dist.all_gather(everyone, v)
        assert all(torch.equal(everyone[0], e) for e in everyone), k


@pytest.mark.parametrize("mode", sorted(_REFUSED))
def test_input_the_codec_refuses_stops_every_rank(mode):
    spawn(_worker_refused_by_codec, 2, mode)
