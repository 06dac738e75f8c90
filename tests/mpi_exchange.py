"""Checks of dist_soup.comm over mpi4py; run as ``mpirun -n P python tests/mpi_exchange.py``.

Every rank prints ``MPI-OK rank/P`` at the end; any failure prints the traceback and aborts the
whole job (so no rank is left waiting in a collective). ``tests/test_comm_mpi.py`` runs it.
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.setdefault("DIST_SOUP_COMPILE", "0")

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from dist_soup.comm import Exchange, MPITransport  # noqa: E402
from dist_soup.compress import build  # noqa: E402

SHAPES = {"w": (33, 7), "b": (33,), "v": (500,)}


def tensors(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100 + rank)
    return {n: torch.randint(-400, 400, s, generator=g).float() / 8 for n, s in SHAPES.items()}


def same_everywhere(tr: MPITransport, result: dict[str, torch.Tensor]) -> bool:
    bits = torch.cat([t.reshape(-1).float().view(torch.int32) for t in result.values()])
    return all(torch.equal(b, bits) for b in tr.all_gather_v(bits, [bits.numel()] * tr.world_size))


def expect_error(fn, *patterns: str) -> None:
    try:
        fn()
    except ValueError as exc:
        assert all(p in str(exc) for p in patterns), (patterns, str(exc))
        return
    raise AssertionError(f"no ValueError with {patterns}")


def main() -> None:
    torch.set_num_threads(1)
    tr = MPITransport()
    rank, P = tr.rank, tr.world_size
    mine = tensors(rank)
    exact = {n: sum(tensors(r)[n] for r in range(P)) / P for n in SHAPES}

    # the primitives
    t = torch.tensor([float(rank), -float(rank)])
    assert tr.all_reduce_(t.clone(), "max").tolist() == [P - 1, 0]
    assert tr.all_reduce_(t.clone(), "sum").tolist() == [sum(range(P)), -sum(range(P))]
    h = torch.full((3,), 0.5 * (rank + 1), dtype=torch.bfloat16)
    assert tr.all_reduce_(h, "sum").float().tolist() == [0.5 * P * (P + 1) / 2] * 3
    b = torch.arange(4) * (rank + 1)
    assert tr.broadcast_(b, P - 1).tolist() == (torch.arange(4) * P).tolist()
    assert [x.item() for x in tr.all_gather_v(torch.tensor([rank]), [1] * P)] == list(range(P))
    pieces = tr.all_to_all_v(torch.arange(P) + 10 * rank, [1] * P, [1] * P)
    assert [x.item() for x in pieces] == [rank + 10 * r for r in range(P)]
    tr.barrier()

    for mode in ("allgather", "allreduce", "two_phase"):
        ex = Exchange("identity", mode, transport="mpi", bucket_mb=0.001)
        means, locals_ = ex.mean_many(mine, return_local=True)
        assert all(torch.equal(means[n], exact[n]) for n in SHAPES), mode
        assert all(torch.equal(locals_[n], mine[n]) for n in SHAPES), mode
        assert same_everywhere(tr, means), mode
        if mode == "allgather":  # MPI's Allgatherv does not pad: only the sizes are overhead
            own = sum(build("identity").compress(x).nbytes for x in mine.values())
            assert (ex.stats.bytes_sent, ex.stats.bytes_received) == (own, (P - 1) * own), ex.stats
        handle = ex.mean_many_async(mine)
        assert all(torch.equal(v, exact[n]) for n, v in handle.wait().items()), mode
        for codec, tol in (("fp16", 1e-3), ("bf16", 8e-3)):
            means = Exchange(codec, mode, transport="mpi").mean_many(mine)
            for n in SHAPES:
                assert (means[n] - exact[n]).abs().max() <= tol * (exact[n].abs().max() + 1), (mode, codec, n)
            assert same_everywhere(tr, means), (mode, codec)
        # QSGD: unbiased, so the average over rounds approaches the exact mean
        ex = Exchange("qsgd", mode, transport="mpi", bits=4, bucket_size=64, min_numel=0, seed=5)
        avg = {n: torch.zeros(s) for n, s in SHAPES.items()}
        rounds = 30
        for i in range(rounds):
            means = ex.mean_many(mine)
            if i == 0:
                first = sum((means[n] - exact[n]).norm() ** 2 for n in SHAPES).sqrt().item()
                assert same_everywhere(tr, means), mode
            for n in SHAPES:
                avg[n] += means[n] / rounds
        err = sum((avg[n] - exact[n]).norm() ** 2 for n in SHAPES).sqrt().item()
        assert 0 < err < 0.5 * first, (mode, err, first)

    # a configuration mismatch raises on every rank, and the job goes on
    ex = Exchange("identity", "allgather" if rank == 0 else "two_phase", transport="mpi")
    expect_error(lambda: ex.mean_many(mine), "differs across ranks", "mode")
    assert torch.equal(Exchange("identity", transport="mpi").mean("v", mine["v"]), exact["v"])
    print(f"MPI-OK {rank}/{P}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
