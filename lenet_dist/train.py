"""Train LeNet-5 on MNIST through accelerate, on one CPU process, several CPU processes or GPUs.

    accelerate launch lenet_dist/train.py [flags]   # processes, precision, dynamo: accelerate's config
    python lenet_dist/train.py [flags]              # one process, no accelerate config needed

Only the main process (rank 0) prints and writes into the output directory.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import accelerate
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed

import lenet_dist
from lenet_dist.config import TrainConfig, default_run_dir, parse_train_config
from lenet_dist.data import InMemoryMNIST, ensure_mnist, load_split, make_loader, normalize, seed_style_dataset
from lenet_dist.errors import UserError, exit_on_user_error
from lenet_dist.figures import save_predictions_grid, show_png
from lenet_dist.model import LeNet5

FIGURE_SAMPLES = 32


def make_accelerator(config: TrainConfig) -> Accelerator:
    # accelerate's multi-process launcher (torchrun) on a machine without GPUs leaves the processes
    # with no backend unless cpu=True, which selects MULTI_CPU over gloo.
    launched_multiprocess = int(os.environ.get("WORLD_SIZE", "1")) > 1
    options: dict[str, Any] = {}
    if config.mixed_precision is not None:  # otherwise accelerate's launch config decides
        options["mixed_precision"] = config.mixed_precision
    if config.compile:
        options["dynamo_backend"] = "inductor"
    try:
        return Accelerator(
            cpu=launched_multiprocess and not torch.cuda.is_available(),
            # split_batches: --batch-size is the global batch, so the recipe does not change with the
            # number of processes; the seedable sampler gives every rank the same shuffled order to shard.
            dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
            **options,
        )
    except ValueError as error:  # e.g. fp16 on a device that cannot do it
        raise UserError(f"accelerate refused the configuration: {error}") from None


def shared_output_dir(accelerator: Accelerator, config: TrainConfig) -> Path:
    """Rank 0 picks the directory (a timestamp would differ across ranks) and tells the others."""
    chosen = [str(config.output_dir or default_run_dir())]
    broadcast_object_list(chosen, from_process=0)
    return Path(chosen[0])


def build_loaders(config: TrainConfig, accelerator: Accelerator, data_dir: Path, test_split):
    if config.data_pipeline == "tensor":
        train_set = InMemoryMNIST(load_split(data_dir, "train"), accelerator.device)
        test_set = InMemoryMNIST(test_split, accelerator.device)
    else:
        train_set, test_set = seed_style_dataset(data_dir, train=True), seed_style_dataset(data_dir, train=False)
    pin_memory = config.pin_memory
    if pin_memory is None:
        pin_memory = accelerator.device.type == "cuda" and config.data_pipeline == "torchvision"
    options = dict(workers=config.resolved_workers(), pin_memory=pin_memory, persistent=config.persistent_workers)
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, **options)
    test_loader = make_loader(test_set, config.batch_size * 8, shuffle=False, **options)
    return train_loader, test_loader


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def train_one_epoch(accelerator: Accelerator, model, loader, optimizer, scheduler) -> float:
    """Returns the mean training loss over all batches and ranks."""
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()  # no .item() here: it would stall a GPU every step
    return accelerator.reduce(loss_sum / len(loader), reduction="mean").item()


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader) -> tuple[int, int]:
    """(correct, seen) over the whole test set; gather_for_metrics drops the padding DDP adds."""
    model.eval()
    correct = seen = 0
    for images, labels in loader:
        predictions, labels = accelerator.gather_for_metrics((model(images).argmax(dim=1), labels))
        correct += int((predictions == labels).sum())
        seen += labels.numel()
    return correct, seen


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "lenet_dist": lenet_dist.__version__,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def train(config: TrainConfig) -> dict[str, Any]:
    accelerator = make_accelerator(config)
    if config.batch_size % accelerator.num_processes:
        raise UserError(
            f"--batch-size {config.batch_size} is the global batch and must divide evenly across "
            f"{accelerator.num_processes} processes"
        )
    set_seed(config.seed)
    data_dir = config.resolved_data_dir()
    config = replace(config, data_dir=str(data_dir), output_dir=str(shared_output_dir(accelerator, config)))
    output_dir = Path(config.output_dir)

    with accelerator.main_process_first():  # one download, not one per rank
        ensure_mnist(data_dir)
    test_split = load_split(data_dir, "test")
    train_loader, test_loader = build_loaders(config, accelerator, data_dir, test_split)

    model = LeNet5()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = make_scheduler(config, optimizer, len(train_loader))
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    accelerator.print(
        f"LeNet-5 on {len(train_loader.dataset):,} MNIST images: {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type}, global batch {config.batch_size}, precision {accelerator.mixed_precision}"
    )

    epochs: list[dict[str, Any]] = []
    training_started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_loss = train_one_epoch(accelerator, model, train_loader, optimizer, scheduler)
        train_seconds = time.perf_counter() - started
        correct, seen = evaluate(accelerator, model, test_loader)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "test_accuracy": correct / seen,
            "eval_samples": seen,
            "seconds": time.perf_counter() - started,
            "train_images_per_second": len(train_loader.dataset) / train_seconds,
            "elapsed_seconds": time.perf_counter() - training_started,
        }
        epochs.append(record)
        accelerator.print(
            f"epoch {epoch}/{config.epochs}  train loss {train_loss:.4f}  test accuracy {correct / seen:.2%} "
            f"({seen:,} images)  {record['seconds']:.1f} s  {record['train_images_per_second']:,.0f} images/s"
        )
        if config.target_accuracy is not None and record["test_accuracy"] >= config.target_accuracy:
            accelerator.print(f"reached --target-accuracy {config.target_accuracy:.2%}; stopping")
            break

    metrics = {
        "config": asdict(config),
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "versions": versions(),
        "epochs": epochs,
        "final_test_accuracy": epochs[-1]["test_accuracy"],
    }
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "metrics.json", metrics)
        figure = save_predictions_grid(*predict_samples(accelerator, model, test_split), output_dir / "predictions.png")
        accelerator.print(f"wrote {output_dir / 'metrics.json'} and {figure}")
        if config.show:
            show_png(figure)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


@torch.no_grad()
def predict_samples(accelerator: Accelerator, model, test_split):
    images, labels = test_split.images[:FIGURE_SAMPLES], test_split.labels[:FIGURE_SAMPLES]
    network = accelerator.unwrap_model(model, keep_torch_compile=False).eval()
    predicted = network(normalize(images).to(accelerator.device)).argmax(dim=1).cpu()
    return images, predicted, labels


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        train(parse_train_config(argv))


if __name__ == "__main__":
    main()
