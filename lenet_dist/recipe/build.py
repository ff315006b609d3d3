"""The recipe's builders: model, optimizer, schedule, data, precision.

`lenet-dist train` (`build_trainer`) and `lenet-dist bench`'s tuned rows use the same builders, so the
bench times what training runs. Constants that are not flags live here, with why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from lenet_dist.config import TrainConfig
from lenet_dist.data import InMemoryDataset, ShuffledBatches, Split, load_split, make_loader, torchvision_dataset
from lenet_dist.errors import UsageError, on_every_rank
from lenet_dist.model import LeNet5
from lenet_dist.recipe.adam import Adam
from lenet_dist.recipe.lr_schedule import build_lr_scheduler
from lenet_dist.recipe.muon import MuonWithAdam

# Adam's beta2 0.95, not 0.999, lets the step size follow the one-cycle learning rate instead of lagging it
# (measured: BENCHMARKS.md, "Why two recipes").
ADAM_BETAS = (0.9, 0.95)
# Evaluation batches: larger than training's (no backward pass), small enough for the CPU's caches (2,000 took
# ~1.6× as long); 500 divides the 10,000 test images, so every batch has one shape. Rounded up to a multiple of
# the process count.
EVAL_BATCH_SIZE = 500


def build_model(config: TrainConfig, num_classes: int) -> LeNet5:
    model = LeNet5(num_classes=num_classes)
    if config.init == "lecun":
        lecun_init(model)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def lecun_init(model: torch.nn.Module) -> None:
    """Weights normal with std 1/√fan-in, biases zero: PyTorch's default has √3× less spread, leaving tanh
    units near-linear. On MNIST it reaches 98 % with about a third fewer images (BENCHMARKS.md)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0, module.weight[0].numel() ** -0.5)
                module.bias.zero_()


def build_optimizer(config: TrainConfig, model: torch.nn.Module, graph: bool = False) -> torch.optim.Optimizer:
    """Fused Adam: one kernel updates all ten parameter tensors. Capturable for a CUDA graph (`graph`);
    the arithmetic is the same. Or Muon with Adam (muon.py), whose step is always capturable."""
    if config.optimizer == "muon":
        output_layer = set(model.classifier[-1].parameters())
        matrices = [p for p in model.parameters() if p.ndim > 1 and p not in output_layer]
        others = [p for p in model.parameters() if p.ndim == 1 or p in output_layer]
        return MuonWithAdam(matrices, others, muon_lr=config.muon_lr, adam_lr=config.lr, betas=ADAM_BETAS,
                            capturable=graph)
    return Adam(model.parameters(), lr=config.lr, betas=ADAM_BETAS, fused=True, capturable=graph)


def build_training_batches(
    config: TrainConfig, train: Split, data_dir: Path, device: torch.device, rank: int, world_size: int
) -> ShuffledBatches | DataLoader:
    """ShuffledBatches for the in-memory pipeline, a DataLoader (for accelerate to shard) for torchvision's;
    train's loop tells them apart by type."""
    if config.data_pipeline == "tensor":
        return ShuffledBatches(InMemoryDataset(train, device), config.batch_size, config.seed, rank, world_size,
                               augment=config.augment)
    dataset = torchvision_dataset(data_dir, config.dataset, train=True)
    return make_loader(dataset, config.batch_size, shuffle=True, drop_last=True, **_loader_options(config, device))


def build_test_loader(config: TrainConfig, test: Split, data_dir: Path, device: torch.device,
                      processes: int) -> DataLoader:
    """The whole test set in order, for accelerate to shard and gather_for_metrics to put back together."""
    batch = -(-EVAL_BATCH_SIZE // processes) * processes
    if config.data_pipeline == "tensor":  # data on the device: worker processes could not touch it on CUDA
        return make_loader(InMemoryDataset(test, device), batch, shuffle=False, workers=0)
    dataset = torchvision_dataset(data_dir, config.dataset, train=False)
    return make_loader(dataset, batch, shuffle=False, **_loader_options(config, device))


@dataclass
class Trainer:
    """Everything a run trains with, built once."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: ShuffledBatches | DataLoader  # accelerate's DataLoader for the torchvision pipeline
    test_loader: DataLoader
    test: Split
    train_images: int
    output_dir: Path


def build_trainer(config: TrainConfig, accelerator: Accelerator, data_dir: Path, output_dir: Path,
                  capturable: bool = False) -> Trainer:
    """`capturable`: an optimizer whose step a CUDA graph can capture (steps.wants_cuda_graph says when)."""
    train_split, test_split = on_every_rank(lambda: [load_split(data_dir, split, config.dataset)
                                                     for split in ("train", "test")])
    batches = build_training_batches(config, train_split, data_dir, accelerator.device, accelerator.process_index,
                                     accelerator.num_processes)
    if len(batches) == 0:  # whole batches only: an epoch would have no step, and the run would never end
        raise UsageError(f"--batch-size {config.batch_size} is more than the {len(train_split.labels):,} training "
                         f"images of {data_dir}; choose at most {len(train_split.labels):,}")
    model = build_model(config, num_classes=len(train_split.info.classes)).to(accelerator.device)
    optimizer = build_optimizer(config, model, graph=capturable)
    scheduler = build_lr_scheduler(config, optimizer, steps_per_epoch=len(batches))
    test_loader = build_test_loader(config, test_split, data_dir, accelerator.device, accelerator.num_processes)
    # the model is on its device already: placing it again would have accelerate look for DTensor parameters,
    # importing torch.distributed.tensor (0.8 s of a run's start on a 2-core EPYC, py-spy)
    model, optimizer, scheduler, test_loader = accelerator.prepare(model, optimizer, scheduler, test_loader,
                                                                   device_placement=[False, True, True, True])
    if not isinstance(batches, ShuffledBatches):
        batches = accelerator.prepare(batches)
    return Trainer(config, accelerator, model, optimizer, scheduler, batches, test_loader, test_split,
                   len(train_split.labels), output_dir)


def _loader_options(config: TrainConfig, device: torch.device) -> dict:
    pin_memory = config.pin_memory
    if pin_memory is None:  # make_loader never pins the in-memory data set, already on the device
        pin_memory = device.type == "cuda"
    return {"workers": config.resolved_workers(), "pin_memory": pin_memory, "persistent": config.persistent_workers}
