"""Joining the launcher's process group: torchrun (or ``--nproc``, which sets the same
variables) for torch.distributed, ``mpirun`` for mpi4py, nothing for a single process; the
rendezvous store keyed by the attempt, so a restarted worker never reads a dead attempt's keys."""

from __future__ import annotations

import os
import socket

import torch

from . import config as config_mod
from . import faults


def launcher_env() -> str:
    """ "torch" under torchrun / --nproc, "mpi" under mpirun, "local" otherwise."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return "torch"
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return "mpi"
    return "local"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(fn, nprocs: int, *args) -> None:
    """Call ``fn(rank, nprocs, *args)`` on ``nprocs`` freshly spawned processes of this machine,
    each with the variables torchrun sets (``MASTER_ADDR`` 127.0.0.1 and a free port, ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``), so ``init_method="env://"`` joins them. A worker's exception
    re-raises here as ``torch.multiprocessing.ProcessRaisedException`` (a death as
    ``ProcessExitedException``). ``fn`` must be importable (a module-level function)."""
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(nprocs, free_port(), fn, args), nprocs=nprocs, start_method="spawn")


def _spawned(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    fn(rank, world, *args)


def init_process_group(*args, **kwargs) -> None:
    """``torch.distributed.init_process_group(*args, **kwargs)``, such that
    ``destroy_process_group`` really ends the group.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument when first
    imported, and torch._dynamo imports it (torch.optim imports torch._dynamo on first use).
    Imported after the group exists, it holds the default group for good: gloo's worker threads
    then outlive ``destroy_process_group`` into interpreter shutdown, and one of them releasing a
    finished work's tensors there aborts a run that succeeded ("terminate called without an
    active exception"). Imported first, it binds None.
    """
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (see above)

    dist.init_process_group(*args, **kwargs)


def init_distributed(timeout_s: float | None = None) -> tuple[str | None, int, int]:
    """(transport name, rank, world size) after joining the launcher's process group.

    ``timeout_s`` (``train.timeout_s``) bounds every collective and store wait of the group.
    """
    kind = launcher_env()
    if kind == "torch":
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():
            timeout_s = float(timeout_s or config_mod.TrainConfig.timeout_s)
            backend = (
                "nccl" if torch.cuda.is_available() and os.environ.get("DIST_SOUP_BACKEND", "") != "gloo" else "gloo"
            )
            init_process_group(
                backend=backend,
                store=_attempt_store(timeout_s),
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=timedelta(seconds=timeout_s),
            )
        return "torch", dist.get_rank(), dist.get_world_size()
    if kind == "mpi":
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError("running under mpirun needs mpi4py: pip install 'dist_soup[mpi]'") from None
        return "mpi", MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    return None, 0, 1


def device_for(kind: str | None) -> torch.device:
    """cuda:LOCAL_RANK under NCCL, the CPU otherwise."""
    import torch.distributed as dist

    if kind == "torch" and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


PEERS: faults.Peers | None = None


GENERATION: int | None = None  # which start of the job's process group this is (1, 2, ...)


def _attempt_store(timeout_s: float):
    """The launcher's rendezvous store, with keys private to this attempt of the job.

    After a failure torchrun restarts every worker against the same store, which still holds
    the keys (gloo addresses) of the dead attempt. ``TORCHELASTIC_RESTART_COUNT`` does not name
    an attempt (each agent counts only its own failures: the agents of healthy nodes restart at
    a lower count), so the ranks agree on a fresh generation number instead
    (:func:`dist_soup.faults.generation_store`).
    """
    from datetime import timedelta

    import torch.distributed as dist

    global PEERS, GENERATION
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        addr,
        port,
        world,
        is_master=not agent_store and rank == 0,
        timeout=timedelta(seconds=timeout_s),
        multi_tenant=not agent_store,
    )
    prefixed, GENERATION = faults.generation_store(store, rank, world, timeout_s)
    PEERS = faults.Peers(prefixed, rank, world, (addr, port))
    return prefixed


def shutdown_distributed(kind: str | None) -> None:
    if kind == "torch":
        import gc

        import torch.distributed as dist

        # Collect dropped exchanges (and the collective handles they held) while the
        # interpreter is whole: gloo work freed during interpreter shutdown can abort.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
