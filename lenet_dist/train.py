"""Train LeNet-5 on MNIST through accelerate, on one CPU process, several CPU processes or GPUs.

    accelerate launch lenet_dist/train.py [flags]   # processes, precision, dynamo: accelerate's config
    python lenet_dist/train.py [flags]              # one process, no accelerate config needed

Only the main process (rank 0) prints and writes into the output directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
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
from torch.profiler import record_function

import lenet_dist
from lenet_dist.checkpoint import (
    Progress, export_weights, find_checkpoint, restore_checkpoint, save_checkpoint, trajectory_of,
)
from lenet_dist.config import TrainConfig, default_run_dir, parse_train_config
from lenet_dist.data import DATASETS, InMemoryMNIST, ensure_dataset, load_split, make_loader, seed_style_dataset
from lenet_dist.errors import UserError, exit_on_user_error
from lenet_dist.figures import save_run_figures, show_png
from lenet_dist.model import LeNet5
from lenet_dist.profiling import labelled, profiler_for
from lenet_dist.reporting import EpochProgress, print_summary

EVAL_BATCH_MULTIPLIER = 8  # no gradients to keep: evaluation affords bigger batches


def make_accelerator(config: TrainConfig) -> Accelerator:
    # accelerate's multi-process launcher (torchrun) on a machine without GPUs leaves the processes
    # with no backend unless cpu=True, which selects MULTI_CPU over gloo.
    launched_multiprocess = int(os.environ.get("WORLD_SIZE", "1")) > 1
    options: dict[str, Any] = {}
    if config.mixed_precision is not None:  # otherwise accelerate's launch config decides
        options["mixed_precision"] = config.mixed_precision
    if config.compile:
        options["dynamo_backend"] = "inductor"
    if config.log_with:
        # accelerate wants a directory now; the run's own is only agreed on (rank 0's timestamp)
        # once the processes can talk, and train() points the trackers there before starting them.
        options.update(log_with=config.log_with, project_dir=".")
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


def pin_cores(accelerator: Accelerator) -> None:
    """Give each local CPU process a disjoint slice of the cores it may run on.

    Left alone, the OS migrates single-threaded ranks between cores and they sometimes share one;
    pinned, 2-process CPU DDP trained ~4 % faster here (4 alternating runs: 15,429 vs 14,860
    second-epoch images/s). --no-pin-cores turns it off.
    """
    if accelerator.device.type != "cpu" or accelerator.num_processes == 1 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    share = len(cores) // local_processes
    if share:
        index = accelerator.local_process_index
        os.sched_setaffinity(0, cores[index * share : (index + 1) * share])


def announce(accelerator: Accelerator, message: str) -> None:
    """Print on global rank 0 only: accelerator.print prints once per machine, not once per job."""
    if accelerator.is_main_process:
        print(message, flush=True)


def agree(accelerator: Accelerator, problem: str | None) -> None:
    """Raise rank 0's verdict on every rank, so no rank is left waiting in a collective."""
    verdict = [problem]
    broadcast_object_list(verdict, from_process=0)
    if verdict[0]:
        raise UserError(verdict[0])


def claim_output_dir(accelerator: Accelerator, config: TrainConfig) -> Path:
    """Rank 0 picks the directory (a timestamp would differ across ranks), checks it, and tells the others."""
    chosen = [str(config.output_dir or default_run_dir())]
    broadcast_object_list(chosen, from_process=0)
    output_dir = Path(chosen[0])
    problem = None
    if accelerator.is_main_process:
        if (output_dir / "metrics.json").exists() and not config.overwrite:
            problem = f"--output-dir {output_dir} already holds a finished run; pass --overwrite or another --output-dir"
        else:
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                probe = output_dir / ".write-probe"
                probe.write_text("ok")
                probe.unlink()
            except OSError as error:
                problem = f"--output-dir {output_dir} is not writable ({error.strerror}); choose another --output-dir"
    agree(accelerator, problem)
    return output_dir


def build_loaders(config: TrainConfig, accelerator: Accelerator, data_dir: Path, test_split):
    if config.data_pipeline == "tensor":
        train_set = InMemoryMNIST(load_split(data_dir, "train", config.dataset), accelerator.device)
        test_set = InMemoryMNIST(test_split, accelerator.device)
    else:
        train_set = seed_style_dataset(data_dir, config.dataset, train=True)
        test_set = seed_style_dataset(data_dir, config.dataset, train=False)
    pin_memory = config.pin_memory
    if pin_memory is None:
        pin_memory = accelerator.device.type == "cuda" and config.data_pipeline == "torchvision"
    options = dict(workers=config.resolved_workers(), pin_memory=pin_memory, persistent=config.persistent_workers)
    train_loader = make_loader(train_set, config.batch_size, shuffle=True, **options)
    test_loader = make_loader(test_set, config.batch_size * EVAL_BATCH_MULTIPLIER, shuffle=False, **options)
    return train_loader, test_loader


def build_model_and_optimizer(config: TrainConfig, num_classes: int = 10) -> tuple[LeNet5, torch.optim.Adam]:
    """LeNet-5 and its Adam as this recipe trains them (the benchmark's tuned rows build them here too)."""
    model = LeNet5(num_classes=num_classes)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # fused: one kernel updates all ten parameter tensors instead of a loop of small ops (~10 % per step on CPU)
    return model, torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def train_one_epoch(accelerator, config, model, loader, optimizer, scheduler, progress: Progress, profiler,
                    output_dir: Path) -> float:
    """Train the rest of `progress.epoch`; returns its mean training loss over all batches and ranks."""
    model.train()
    steps = len(loader)
    loader.set_epoch(progress.epoch - 1)  # the shuffle order is a function of (seed, epoch) alone
    if progress.batches_done:  # resuming mid-epoch: the same order, minus the batches already trained
        loader = accelerator.skip_first_batches(loader, progress.batches_done)
        loader.set_epoch(progress.epoch - 1)
    bar = EpochProgress(
        enabled=accelerator.is_main_process, fancy=config.progress and sys.stdout.isatty(),
        epoch=progress.epoch, epochs=config.epochs, steps=steps, batch_size=config.batch_size,
        done=progress.batches_done,
    )
    epoch_loss = torch.tensor(progress.loss_sum, device=accelerator.device)
    window_loss, window_steps = torch.zeros((), device=accelerator.device), 0
    for images, labels in labelled(loader, "data_loading"):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        with record_function("optimizer_step"):
            optimizer.step()
        scheduler.step()
        profiler.step()
        epoch_loss += loss.detach()  # no .item() per step: it would stall a GPU
        window_loss += loss.detach()
        window_steps += 1
        progress.batches_done += 1
        progress.global_step += 1

        due_checkpoint = config.checkpoint_every and progress.global_step % config.checkpoint_every == 0
        if progress.global_step % config.log_every == 0 or due_checkpoint or progress.batches_done == steps:
            mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / window_steps
            if not math.isfinite(mean_loss):
                bar.close()
                raise UserError(
                    f"training loss became {mean_loss} by step {progress.global_step} (epoch {progress.epoch}); "
                    f"the last good checkpoint is kept in {output_dir / 'checkpoints'}; lower --lr"
                )
            accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0]}, step=progress.global_step)
            bar.update(progress.batches_done, mean_loss)
            window_loss.zero_()
            window_steps = 0
        else:
            bar.update(progress.batches_done)
        if due_checkpoint and progress.batches_done < steps:  # the epoch end saves its own
            progress.loss_sum = accelerator.reduce(epoch_loss, reduction="mean").item()
            save_checkpoint(accelerator, output_dir, progress, config.keep_checkpoints)
    bar.close()
    return accelerator.reduce(epoch_loss, reduction="mean").item() / steps


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader) -> dict[str, torch.Tensor]:
    """Predictions for the whole test set, in order, on every rank.

    gather_for_metrics drops the samples DDP pads the last batch with, so each image counts once.
    """
    model.eval()
    predicted, confidence, truth = [], [], []
    for images, labels in loader:
        probabilities = model(images).float().softmax(dim=1)
        top, classes = probabilities.max(dim=1)
        classes, top, labels = accelerator.gather_for_metrics((classes, top, labels))
        predicted.append(classes.cpu())
        confidence.append(top.cpu())
        truth.append(labels.cpu())
    return {"predicted": torch.cat(predicted), "confidence": torch.cat(confidence), "truth": torch.cat(truth)}


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


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """TensorBoard's hparams take numbers, strings and booleans only."""
    return {key: value for key, value in asdict(config).items() if isinstance(value, (int, float, str, bool))}


def train(config: TrainConfig) -> dict[str, Any]:
    accelerator = make_accelerator(config)
    if config.batch_size % accelerator.num_processes:
        raise UserError(
            f"--batch-size {config.batch_size} is the global batch and must divide evenly across "
            f"{accelerator.num_processes} processes"
        )
    if config.deterministic:  # cuBLAS refuses deterministic mode without a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(config.seed, deterministic=config.deterministic)
    if config.pin_cores:
        pin_cores(accelerator)
    data_dir = config.resolved_data_dir()
    with accelerator.main_process_first():  # one download, not one per rank
        ensure_dataset(data_dir, config.dataset)
    output_dir = claim_output_dir(accelerator, config)
    config = replace(config, data_dir=str(data_dir), output_dir=str(output_dir))
    if accelerator.is_main_process:
        write_json(output_dir / "config.json", asdict(config))

    test_split = load_split(data_dir, "test", config.dataset)
    train_loader, test_loader = build_loaders(config, accelerator, data_dir, test_split)
    model, optimizer = build_model_and_optimizer(config, num_classes=len(DATASETS[config.dataset].classes))
    scheduler = make_scheduler(config, optimizer, len(train_loader))
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    if config.log_with:
        accelerator.project_configuration.project_dir = str(output_dir)
        accelerator.project_configuration.logging_dir = str(output_dir)
        accelerator.init_trackers(config.log_with, config=tracker_config(config))

    progress = Progress(trajectory=trajectory_of(config))
    if config.resume:
        checkpoint = find_checkpoint(config.resume, output_dir)
        progress = restore_checkpoint(accelerator, checkpoint, config)
        announce(accelerator, f"resumed from {checkpoint}: epoch {progress.epoch}, step {progress.global_step}")
    announce(
        accelerator,
        f"LeNet-5 on {len(train_loader.dataset):,} {config.dataset} images: {accelerator.num_processes} process(es) "
        f"on {accelerator.device.type}, global batch {config.batch_size}, precision {accelerator.mixed_precision}"
    )

    profile_dir = Path(config.profile_dir) / output_dir.name
    results = None
    training_started = time.perf_counter()
    with profiler_for(config, profile_dir, f"rank{accelerator.process_index}") as profiler:
        while progress.epoch <= config.epochs:
            started = time.perf_counter()
            batches_before = progress.batches_done
            train_loss = train_one_epoch(
                accelerator, config, model, train_loader, optimizer, scheduler, progress, profiler, output_dir
            )
            train_seconds = time.perf_counter() - started
            results = evaluate(accelerator, model, test_loader)
            accuracy = (results["predicted"] == results["truth"]).float().mean().item()
            record = {
                "epoch": progress.epoch,
                "train_loss": train_loss,
                "test_accuracy": accuracy,
                "eval_samples": len(results["truth"]),
                "seconds": time.perf_counter() - started,
                "train_images_per_second": (progress.batches_done - batches_before) * config.batch_size / train_seconds,
                "elapsed_seconds": time.perf_counter() - training_started,
            }
            progress.epochs.append(record)
            accelerator.log(
                {"test/accuracy": accuracy, "train/images_per_second": record["train_images_per_second"]},
                step=progress.global_step,
            )
            announce(
                accelerator,
                f"epoch {progress.epoch}/{config.epochs}  train loss {train_loss:.4f}  test accuracy {accuracy:.2%} "
                f"({record['eval_samples']:,} images)  {record['seconds']:.1f} s  "
                f"{record['train_images_per_second']:,.0f} images/s"
            )
            reached_target = config.target_accuracy is not None and accuracy >= config.target_accuracy
            progress.epoch, progress.batches_done, progress.loss_sum = progress.epoch + 1, 0, 0.0
            save_checkpoint(accelerator, output_dir, progress, config.keep_checkpoints)
            if reached_target:
                announce(accelerator, f"reached --target-accuracy {config.target_accuracy:.2%}; stopping")
                break
    if results is None:  # resumed from the final checkpoint of a run that stopped before writing
        results = evaluate(accelerator, model, test_loader)
    if config.profile:
        announce(accelerator, f"profiler traces (one per rank): {profile_dir}/  inspect: lenet-dist inspect {profile_dir}")

    metrics = {
        "config": asdict(config),
        "world_size": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "versions": versions(),
        "epochs": progress.epochs,
        "final_test_accuracy": progress.epochs[-1]["test_accuracy"],
    }
    if accelerator.is_main_process:
        network = accelerator.unwrap_model(model, keep_torch_compile=False)
        weights = export_weights(network, output_dir, {"config": asdict(config), "num_classes": network.num_classes})
        figures = save_run_figures(
            output_dir, metrics["epochs"], results, test_split.images, DATASETS[config.dataset].classes
        )
        write_json(output_dir / "metrics.json", metrics)  # last: its presence marks the run finished
        print_summary(metrics)
        announce(accelerator, f"wrote {output_dir}/: metrics.json, {weights.name}, " + ", ".join(f.name for f in figures))
        if config.show:
            show_png(figures[0])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        train(parse_train_config(argv))


if __name__ == "__main__":
    main()
