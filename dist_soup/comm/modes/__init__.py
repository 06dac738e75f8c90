"""The three compressed collectives, one bucket at a time.

Each mode turns the P ranks' copies of one bucket of tensors ``g^p`` into the mean
``(1/P) sum_p C(g^p)`` that every rank then holds bit for bit, where ``C`` is the codec's
encode-then-decode (with whatever residue the stream keeps):

``allgather``
    every rank compresses each tensor with its own stream, the payloads of the bucket are
    concatenated, their sizes all-gathered (one int64 per tensor per rank), then the payloads
    all-gathered in one collective; every rank decodes all P payloads and averages them in rank
    order. Works for every codec. Per rank: sends S/rho, receives (P-1) S/rho.
``allreduce``
    linear codecs only (:class:`~dist_soup.compress.LinearCodec`): the codecs' agreement tensors
    are reduced (MAX or SUM, fused per op and dtype) or broadcast from their leader, every rank
    encodes against the agreed values, and the wire tensors of the bucket (fused per dtype) are
    summed in one all-reduce and decoded. Sends and receives about S/rho whatever P is.
``two_phase``
    the bucket is flattened and cut into P chunks; chunk j of every rank is compressed with that
    rank's stream for chunk j and sent to rank j (one all-to-all, sizes exchanged first); rank j
    decodes the P versions of its chunk, averages them, compresses the average with its own
    *server* stream (which keeps its own residue), and the P server payloads are all-gathered and
    decoded by everyone. Per rank: sends about S/rho (1 - 1/P) + S/(P rho), receives about
    2 S/rho (1 - 1/P): about twice the payload, whatever P is.

A mode's ``start`` encodes and launches the bucket's collectives and returns a
:class:`BucketWork`; its ``finish`` waits, decodes and returns ``(means, locals)``, where
``locals`` (when asked for) are this rank's own decoded contributions: what the other ranks
decode from it. Decoding a payload another rank sent never touches a stream's state.

Pipelining over the buckets of one call (the exchange drives it; every rank issues the same
collectives in the same order): ``prepare`` launches what needs only the inputs (allreduce: the
shared-scale agreement) for bucket j+1 before bucket j's payload goes out, so that small
collective does not queue behind the payload on the wire; ``start``/``launch`` returns with
the payload collective in flight, so bucket j+1 is encoded while bucket j travels;
``advance`` launches a later round (two_phase: phase 2) of bucket j+1 before bucket j is
decoded; ``allgather`` decodes this rank's own payload from its local bytes before waiting.
``finish(out)`` may form a mean directly in memory the caller supplies (the exchange's
``out=``, or the slice of a tensor cut into pieces), saving the copy.
"""

from __future__ import annotations

from .allgather import AllGather
from .allreduce import AllReduce
from .base import REJECTED, STATUS_BYTES, BucketWork, DecodeError, Mode, Prepared, RemoteNonFinite, decode_payload
from .two_phase import TwoPhase

MODES: dict[str, type[Mode]] = {cls.name: cls for cls in (AllGather, AllReduce, TwoPhase)}

__all__ = [
    "MODES",
    "REJECTED",
    "STATUS_BYTES",
    "AllGather",
    "AllReduce",
    "BucketWork",
    "DecodeError",
    "Mode",
    "Prepared",
    "RemoteNonFinite",
    "TwoPhase",
    "decode_payload",
]
