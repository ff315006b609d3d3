"""The ceiling the training loop is measured against: train's model, optimizer and batches, a bare loop.

`lenet-dist train`'s model, optimizer, learning rate and in-memory batches in a plain PyTorch loop (no
accelerate, logging, progress bar or evaluation); one epoch, timed as a run times its epochs.

    python -m lenet_dist.bench.bare --data-dir DIR --batch-size 64 [--compile] --summary out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lenet_dist.config import TrainConfig
from lenet_dist.data import InMemoryDataset, ShuffledBatches, load_split
from lenet_dist.recipe.build import build_model, build_optimizer
from lenet_dist.recipe.lr_schedule import build_lr_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (static shapes) first")
    parser.add_argument("--summary", required=True, help="where to write the epoch's images/s as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TrainConfig(batch_size=args.batch_size)
    batches = ShuffledBatches(InMemoryDataset(load_split(Path(args.data_dir), "train", "mnist"), torch.device("cpu")),
                              config.batch_size, config.seed, 0, 1)
    model = build_model(config, num_classes=10)
    optimizer = build_optimizer(config, model)
    scheduler = build_lr_scheduler(config, optimizer, steps_per_epoch=len(batches))
    network = torch.compile(model, dynamic=False) if args.compile else model
    if args.compile:  # compiled before the clock starts, as train's --compile does
        F.cross_entropy(network(torch.zeros(args.batch_size, 1, 28, 28)), torch.zeros(args.batch_size,
                                                                                      dtype=torch.long)).backward()
        model.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for images, labels in batches.epoch(0):
        loss = F.cross_entropy(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - started
    Path(args.summary).write_text(json.dumps({"train_images_per_second": len(batches) * args.batch_size / seconds,
                                              "seconds": seconds, "final_loss": loss.item()}))


if __name__ == "__main__":
    main()
