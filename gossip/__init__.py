"""gossip: decentralized training for PyTorch.

FedAvg, DiLoCo, NoLoCo and (variance-corrected) gossip averaging, run for real over
torch.distributed (NCCL or Gloo) and simulated on many virtual nodes, through one algorithm
object and a small Communicator protocol.
"""

__version__ = "0.1.0"
