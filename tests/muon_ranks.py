"""One rank of tests/test_ddp.py's Muon test, started by torchrun: N Muon steps on shared random batches, each
rank with its own number of threads, gradients averaged as DDP averages them; prints a digest of the weights."""

from __future__ import annotations

import hashlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lenet_dist.config import TrainConfig
from lenet_dist.recipe.build import build_model, build_optimizer

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1 + rank)  # Newton–Schulz's products round differently with another thread count
torch.manual_seed(0)
config = TrainConfig(optimizer="muon")
model = build_model(config, num_classes=10)
optimizer = build_optimizer(config, model)
batches = torch.Generator().manual_seed(1)
for _ in range(int(sys.argv[1])):
    images, labels = torch.randn(64, 1, 28, 28, generator=batches), torch.randint(0, 10, (64,), generator=batches)
    share = slice(rank * 64 // world, (rank + 1) * 64 // world)
    optimizer.zero_grad()
    F.cross_entropy(model(images[share]), labels[share]).backward()
    for parameter in model.parameters():
        dist.all_reduce(parameter.grad)
        parameter.grad /= world
    optimizer.step()
weights = b"".join(parameter.detach().contiguous().numpy().tobytes() for parameter in model.parameters())
sys.stdout.write(f"rank {rank}: {hashlib.sha256(weights).hexdigest()}\n")  # one write: lines stay whole
sys.stdout.flush()
dist.barrier()  # neither rank tears its connections down while the other still uses them
dist.destroy_process_group()
