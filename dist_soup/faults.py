"""What a training rank does about faults: joining a restarted group, lost peers, preemption,
per-rank step times.

**Joining after a restart.** Under torchrun (c10d rendezvous) every worker of every attempt
meets its peers through one TCPStore that the agent of node 0 keeps for the whole job
(``TORCHELASTIC_USE_AGENT_STORE``); the keys of an attempt stay in it after the attempt died.
``TORCHELASTIC_RESTART_COUNT`` cannot tell attempts apart: each agent counts its *own* failed
worker groups, so after a worker died on node 1 its agent restarts with count 1 while node 0's
agent, whose workers were healthy, restarts with count 0. Prefixing the keys with that count
split the new workers into two groups: node 0's found the addresses that the dead attempt's
workers had published under ``attempt0`` and failed in gloo's ``connectFullMesh`` with
"Connection refused", node 1's waited under ``attempt1`` for peers that never came (and a later
attempt could again meet stale keys, or hang). :func:`generation_store` instead has the ranks
of an attempt agree on a number no earlier attempt used: rank 0 draws it from a counter in the
store, every other rank announces itself under a fresh random token and rank 0 answers that
token, so nobody can read an answer meant for a dead process. The process group then uses
keys under ``dist_soup/gen<N>/`` only.

**Lost peers.** Every collective of the process group gives up after ``train.timeout_s``. A
rank whose collective fails (a peer died: "Connection closed by peer"; a link is down: a
timeout) posts that to the store, waits briefly for the others' posts, and exits with
:data:`EXIT_PEER_LOST` and a message naming the ranks (and their addresses) that did not post.

**Preemption.** SIGTERM (what Slurm and Kubernetes send) only sets a flag. At every step
boundary the ranks all-reduce a small float64 tensor (:class:`StepControl`) that carries every
rank's step times and the flag, so they all stop after the same step, write a checkpoint and
exit with :data:`EXIT_PREEMPTED`; ``--resume`` continues from it exactly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import torch

#: Exit code of a rank stopped by SIGTERM after writing a checkpoint at a step boundary
#: (75 is EX_TEMPFAIL: try again; ``--resume`` continues exactly).
EXIT_PREEMPTED = 75
#: Exit code of a rank whose collectives failed (a peer died, a link went down, a timeout);
#: the run dir keeps the last checkpoint written before the fault.
EXIT_PEER_LOST = 76

_PREFIX = "dist_soup"


# --- joining ---------------------------------------------------------------------------------
def local_address(master_addr: str, master_port: int) -> str:
    """This host's address on the route to the store (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, master_port))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def generation_store(store, rank: int, world: int, timeout_s: float):
    """``(prefixed store, generation)``: a store view private to this attempt of the job.

    ``store`` is the job's shared TCPStore (keys of earlier attempts may be in it). Rank 0 takes
    the next value of ``dist_soup/generations``; rank r > 0 writes a random token under
    ``dist_soup/hello/<r>`` and blocks on ``dist_soup/answer/<token>``; rank 0 answers every
    token it sees until every rank r has confirmed under ``dist_soup/gen<N>/joined/<r>``. A
    token is never reused, so no rank can take an answer meant for a dead process, and a stale
    ``hello`` of a dead process only earns an answer nobody reads.
    """
    import torch.distributed as dist

    if rank == 0:
        gen = int(store.add(f"{_PREFIX}/generations", 1))
        answered: dict[int, bytes] = {}
        pending = set(range(1, world))
        deadline = time.monotonic() + timeout_s
        while pending:
            for r in sorted(pending):
                if store.check([f"{_PREFIX}/gen{gen}/joined/{r}"]):
                    pending.discard(r)
                    continue
                if store.check([f"{_PREFIX}/hello/{r}"]):
                    token = store.get(f"{_PREFIX}/hello/{r}")
                    if answered.get(r) != token:
                        store.set(f"{_PREFIX}/answer/{token.decode()}", str(gen))
                        answered[r] = token
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"rank 0: ranks {sorted(pending)} did not join within train.timeout_s={timeout_s:g} s"
                    )
                time.sleep(0.005)
    else:
        token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        store.set(f"{_PREFIX}/hello/{rank}", token)
        gen = int(store.get(f"{_PREFIX}/answer/{token}"))  # blocks up to the store's timeout
        store.set(f"{_PREFIX}/gen{gen}/joined/{rank}", "1")
    return dist.PrefixStore(f"{_PREFIX}/gen{gen}", store), gen


class Peers:
    """Who is where in this attempt: each rank publishes its address at start."""

    def __init__(self, store, rank: int, world: int, master: tuple[str, int]) -> None:
        self.store, self.rank, self.world, self.master = store, rank, world, master
        self.addr = local_address(*master)
        store.set(f"addr/{rank}", self.addr)

    def _addr(self, r: int) -> str:
        try:
            return self.store.get(f"addr/{r}").decode() if self.store.check([f"addr/{r}"]) else "?"
        except Exception:
            return "?"

    def _survey(self, step: int | None, grace_s: float, stop) -> str:
        """Post this rank's failure, collect the others' for ``grace_s``: who stayed silent."""
        try:
            self.store.set_timeout(timedelta(seconds=max(1.0, grace_s)))
            self.store.set(f"failed/{self.rank}", str(step))
            deadline = time.monotonic() + grace_s
            silent = [r for r in range(self.world) if r != self.rank]
            stopped = False
            while silent and time.monotonic() < deadline:
                silent = [r for r in silent if not self.store.check([f"failed/{r}"])]
                if stop():
                    stopped = True
                    break
                time.sleep(0.05)
            if not silent:
                return " Every other rank saw the failure too."
            who = ", ".join(f"rank {r} ({self._addr(r)})" for r in silent)
            if stopped:
                return f" The launcher is stopping this worker; not yet heard from: {who}."
            return f" No word from {who}: dead, or cut off from this host."
        except Exception:
            return (
                f" The store at {self.master[0]}:{self.master[1]} (on rank 0's node) is out of reach as "
                "well: this host is cut off (its link is down?) or node 0 is gone."
            )

    def diagnose(self, exc: BaseException, step: int | None, grace_s: float = 2.0, stop=lambda: False) -> str:
        """A one-paragraph account of a failed collective: the error, the ranks that did not
        report the failure themselves within ``grace_s`` (dead, or on the far side of a down
        link), or that the store itself is out of reach."""
        first = _first_line(exc)
        where = f"at step {step}" if step is not None else "while starting"
        head = f"[dist_soup] rank {self.rank} ({self.addr}): communication failed {where}: {first}."
        named = sorted(set(re.findall(r"\[(\d+\.\d+\.\d+\.\d+)\]:\d+", str(exc))) - {self.addr})
        # The store calls run in a thread with a hard deadline: a TCPStore request to a host
        # behind a down link blocks in recv() whatever the store's timeout says.
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(self._survey(step, grace_s, stop)), daemon=True)
        thread.start()
        thread.join(grace_s + 2.0)
        tail = (
            result[0]
            if result
            else (
                f" The store at {self.master[0]}:{self.master[1]} (on rank 0's node) is out of reach as "
                "well: this host is cut off (its link is down?) or node 0 is gone."
            )
        )
        if named:
            tail += f" The error names peer {', '.join(named)}."
        return head + tail


def is_comm_error(exc: BaseException) -> bool:
    """A failure of the process group's transport or store (not a bug or a bad config)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    if isinstance(exc, (RuntimeError, TimeoutError, ConnectionError)):
        text = str(exc)
        return any(
            s in text
            for s in (
                "gloo",
                "Gloo",
                "pair closure",
                "Application timeout",
                "Connection reset",
                "Connection closed",
                "Connection refused",
                "Timed out",
                "timed out",
                "Socket Timeout",
                "Broken pipe",
                "Transport endpoint",
            )
        )
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0].split(". This is typically caused")[0]
    line = re.sub(r"\[/[^\]]*third_party/gloo/", "[gloo/", line)  # drop the build path of gloo sources
    return line[:400]


# --- preemption ------------------------------------------------------------------------------
class Preemption:
    """Context manager: SIGTERM sets ``requested`` instead of killing the process."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Preempted(Exception):
    """Raised after the preemption checkpoint: every rank stops at the same step."""

    def __init__(self, step: int, path) -> None:
        super().__init__(f"preempted (SIGTERM) after step {step}; checkpoint {path}")
        self.step, self.path = step, path


# --- step control ----------------------------------------------------------------------------
class StepControl:
    """One all-reduce per step of ``2P + 1`` float64 values: every rank's step time, its local
    compute time (:func:`compute_time`) and the stop flag. Plain tensors, no pickle.

    The ranks meet in collectives inside every step, so their step times are all about the
    slowest rank's; the compute times are each rank's own: a straggler's stands out.

    The reduction of step s is launched asynchronously at its end and collected at the end of
    step s + 1 (``push`` returns the previous step's result), so no step waits for it. A
    SIGTERM raised during step s therefore stops every rank after step s + 1: still the same
    step on all of them. ``flush`` collects the pending result at once (before a checkpoint,
    after the last step)."""

    def __init__(self, transport, world: int, rank: int) -> None:
        self.transport, self.world, self.rank = transport, world, rank
        self._bufs = [torch.zeros(2 * world + 1, dtype=torch.float64) for _ in range(2)]
        self._turn = 0
        self._pending: tuple[int, torch.Tensor, Any] | None = None  # (step, buffer, work)

    def push(self, step: int, step_s: float, compute_s: float, stop: bool):
        """Launch step ``step``'s reduction; the previous step's result or None (see ``flush``)."""
        prev = self.flush()
        P, b = self.world, self._bufs[self._turn]
        self._turn ^= 1
        b.zero_()
        b[self.rank] = step_s
        b[P + self.rank] = compute_s
        b[2 * P] = 1.0 if stop else 0.0
        work = self.transport.all_reduce_async_(b, "sum") if P > 1 else None
        self._pending = (step, b, work)
        return prev

    def flush(self):
        """``(step, step times, compute times, stop)`` of the pending reduction, or None."""
        if self._pending is None:
            return None
        step, b, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        P = self.world
        return step, b[:P].tolist(), b[P : 2 * P].tolist(), bool(b[2 * P] > 0)


#: Engine timings of work without a collective in it (see ``SoupEngine.step``'s timings).
LOCAL_TIMINGS = ("jacobian_s", "backward_s", "optimizer_s")


def compute_time(forward_s: float, timings: dict) -> float:
    """This rank's local computation in a step: the batch and forward pass (timed by the
    training loop) plus the engine's local phases (:data:`LOCAL_TIMINGS`); time blocked in a
    collective (the exchanges, the Gram matrix, the solve's agreement) is left out."""
    return float(forward_s + sum(timings.get(k, 0.0) for k in LOCAL_TIMINGS))


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
