import torch

from tests.distributed import run_ranks


def _allreduce(comm):
    x = torch.full((1, 5), float(comm.nodes[0]))
    comm.all_reduce_mean_(x)
    return x


def test_harness_all_reduce():
    outs = run_ranks(_allreduce, 2)
    assert torch.equal(outs[0], torch.full((1, 5), 0.5))
