"""Your model, your loop: a small CNN on sklearn's 8x8 digits, averaged by ``gossip.attach``.

    torchrun --standalone --nproc-per-node 2 examples/cnn_attach.py --algo noloco
"""

import argparse
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import gossip

parser = argparse.ArgumentParser()
parser.add_argument("--algo", choices=["noloco", "fedavg"], default="noloco")
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--sync-every", type=int, default=20)
parser.add_argument("--out", help="a folder: each rank saves its final model there")
args = parser.parse_args()
if args.steps < 1 or args.sync_every < 1:
    parser.error(f"--steps and --sync-every must be >= 1, got {args.steps} and {args.sync_every}")
if args.out:
    os.makedirs(args.out, exist_ok=True)  # before training, not after it

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
(x_test, y_test), x, y = (x[-300:], y[-300:]), x[:-300][rank::world], y[:-300][rank::world]

torch.manual_seed(rank)  # a different init per rank on purpose: attach broadcasts rank 0's
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
config = {"noloco": gossip.NoLoCoConfig, "fedavg": gossip.FedAvgConfig}[args.algo]
with gossip.attach(model, optimizer, config(sync_every=args.sync_every)):  # torchrun's group
    for _ in range(args.steps):  # no step counter: each optimizer.step() is one inner step
        batch = torch.randint(len(x), (32,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # every sync_every-th step also averages (params and BatchNorm stats)

model.eval()
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"rank {rank}: train loss {loss.item():.4f}, test accuracy {accuracy:.4f}", flush=True)
if args.out:
    torch.save(model.state_dict(), os.path.join(args.out, f"rank{rank}.pt"))
dist.destroy_process_group()  # left to the interpreter's exit, Gloo's teardown can abort a rank
