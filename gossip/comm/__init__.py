"""Communicators: the transport behind the algorithms (see :mod:`gossip.comm.base`)."""

from gossip.comm.base import (
    CommError,
    CommTimeout,
    Communicator,
    DenseReceived,
    GatheredReceived,
    PeerFailure,
    Received,
    Traffic,
)
from gossip.comm.stacked import StackedCommunicator
from gossip.comm.torch_comm import TorchCommunicator, init_from_env

__all__ = [
    "CommError",
    "CommTimeout",
    "Communicator",
    "DenseReceived",
    "GatheredReceived",
    "PeerFailure",
    "Received",
    "StackedCommunicator",
    "TorchCommunicator",
    "Traffic",
    "init_from_env",
]
