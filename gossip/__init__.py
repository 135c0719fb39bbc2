"""gossip: decentralized training for PyTorch.

FedAvg, DiLoCo, NoLoCo and (variance-corrected) gossip averaging, run for real over
torch.distributed (NCCL or Gloo) and simulated on many virtual nodes, through one algorithm
object and a small Communicator protocol.

Your own loop: :func:`attach` hooks an algorithm onto ``optimizer.step()``; the config's type
picks the algorithm::

    import gossip
    with gossip.attach(model, optimizer, gossip.NoLoCoConfig(sync_every=50)):
        ...  # your loop; every optimizer.step() is one inner step
"""

from gossip.algorithms import (
    Choco,
    ChocoConfig,
    DiLoCo,
    DiLoCoConfig,
    FedAvg,
    FedAvgConfig,
    Gossip,
    GossipConfig,
    NoLoCo,
    NoLoCoConfig,
    SyncStats,
)
from gossip.allocator import reuse_freed_memory
from gossip.attach import AlgorithmConfig, Attached, attach
from gossip.comm import Communicator, TorchCommunicator, init_from_env
from gossip.topology import Topology, make_topology

__version__ = "0.1.0"

__all__ = [
    "AlgorithmConfig",
    "Attached",
    "Choco",
    "ChocoConfig",
    "Communicator",
    "DiLoCo",
    "DiLoCoConfig",
    "FedAvg",
    "FedAvgConfig",
    "Gossip",
    "GossipConfig",
    "NoLoCo",
    "NoLoCoConfig",
    "SyncStats",
    "Topology",
    "TorchCommunicator",
    "__version__",
    "attach",
    "init_from_env",
    "make_topology",
    "reuse_freed_memory",
]
