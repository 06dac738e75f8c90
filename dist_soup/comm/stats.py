"""Byte and time accounting of one :class:`~dist_soup.comm.Exchange` on one rank.

What counts (all cumulative since construction or ``reset()``):

* ``bytes_sent``: payload bytes of *this rank's* data handed to a collective that delivers them
  to at least one other rank: its compressed payloads (all-gather), the wire and agreement
  tensors it contributes (all-reduce; a broadcast counts on its source only), the chunks it
  sends to other ranks (all-to-all; the piece addressed to itself never leaves).
* ``bytes_received``: payload bytes of other ranks' data this rank got back: the others'
  payloads (all-gather), the reduced wire and agreement tensors (all-reduce; a broadcast counts
  on its receivers), the chunks other ranks sent it (all-to-all).
* ``overhead_bytes``: what travels besides payloads, as handed in by this rank: configuration
  fingerprints, size exchanges, and the padding a transport adds to make all-gather pieces equal.
* ``dense_bytes``: what plain fp32 would have been, ``4 * numel`` per tensor per call.
* ``encode_s``, ``comm_s``, ``decode_s``: wall-clock seconds spent compressing, blocked in
  collectives, and decompressing/averaging. With the asynchronous calls ``comm_s`` only counts
  time spent waiting, so overlap with computation shows up as a smaller ``comm_s``.
* ``calls`` (exchange calls) and ``collectives`` (collectives issued, control ones included).

With a single rank nothing leaves the process, so every byte count but ``dense_bytes`` stays 0.
These are logical bytes: how a back end routes them (a ring all-reduce moves about
``2 (P-1)/P`` times a tensor per rank) is the back end's business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ExchangeStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    overhead_bytes: int = 0
    dense_bytes: int = 0
    encode_s: float = 0.0
    comm_s: float = 0.0
    decode_s: float = 0.0
    calls: int = 0
    collectives: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0.0 if f.type == "float" else 0)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def compression_ratio(self) -> float:
        """``dense_bytes / bytes_sent`` (inf when nothing was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else float("inf")
