"""Compressed collectives: transports (torch.distributed, mpi4py, a local group of one), the
three collective modes, bucketing, configuration agreement and byte accounting.

``Exchange(compressor, mode, **options).mean(name, tensor)`` is the entry point; comm knows
codecs (``dist_soup.compress``) but nothing of objectives.
"""

from .agreement import NonFiniteError
from .exchange import Exchange, ExchangeHandle, wait_all
from .modes import DecodeError
from .stats import ExchangeStats
from .transport import LocalTransport, TorchTransport, Transport, Work, make_transport


def __getattr__(name: str):
    # mpi4py is optional: import its transport only when asked for.
    if name == "MPITransport":
        from .mpi import MPITransport

        return MPITransport
    raise AttributeError(name)


__all__ = [
    "DecodeError",
    "Exchange",
    "ExchangeHandle",
    "NonFiniteError",
    "ExchangeStats",
    "LocalTransport",
    "MPITransport",
    "TorchTransport",
    "Transport",
    "Work",
    "make_transport",
    "wait_all",
]
