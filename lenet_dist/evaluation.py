"""The test pass: predictions for the whole test set, every image counted once, and its record in the run."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
from accelerate import Accelerator

from lenet_dist.cadence import RunState
from lenet_dist.distributed.processes import announce
from lenet_dist.recipe.build import Trainer


def warm_up_evaluation(trainer: Trainer) -> None:
    """One evaluation batch through the model before the clock starts: the first evaluation would otherwise
    pay, inside the time to the target, for loading its kernels (on CUDA also cuDNN's choice of algorithms)."""
    batch = trainer.test_loader.total_batch_size // trainer.accelerator.num_processes
    trainer.model.eval()
    with torch.inference_mode():
        trainer.model(torch.zeros(batch, 1, 28, 28, device=trainer.accelerator.device))


@torch.inference_mode()  # a third faster than no_grad here: no version counters, no view tracking
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader: Iterable) -> dict[str, torch.Tensor]:
    """Predictions for the whole test set, in order, on every rank.

    gather_for_metrics drops the samples DDP pads the last batch with, so each image counts once.
    """
    model.eval()
    predicted, confidence, truth = [], [], []
    for images, labels in loader:
        probabilities = model(images).float().softmax(dim=1)
        top, classes = probabilities.max(dim=1)
        classes, top, labels = accelerator.gather_for_metrics((classes, top, labels))
        predicted.append(classes)
        confidence.append(top)
        truth.append(labels)
    # one copy to the host at the end, not one per batch: each would wait for the GPU
    return {name: torch.cat(parts).cpu() for name, parts in
            (("predicted", predicted), ("confidence", confidence), ("truth", truth))}


def evaluate_and_record(trainer: Trainer, progress: RunState, epoch_ended: bool) -> dict[str, torch.Tensor]:
    """Evaluate (timed apart from training), add the evaluation (and at an epoch's end the epoch) to
    `progress`, log and print it; the predictions."""
    accelerator, config = trainer.accelerator, trainer.config
    started = time.perf_counter()
    predictions = evaluate(accelerator, trainer.model, trainer.test_loader)
    progress.eval_seconds += time.perf_counter() - started
    accuracy = (predictions["predicted"] == predictions["truth"]).float().mean().item()
    evaluation = {
        "step": progress.global_step, "epoch": progress.epoch, "images": progress.global_step * config.batch_size,
        "test_accuracy": accuracy, "eval_samples": len(predictions["truth"]),
        "elapsed_seconds": progress.elapsed_seconds,
    }
    progress.evaluations.append(evaluation)
    accelerator.log({"test/accuracy": accuracy}, step=progress.global_step)
    if not epoch_ended:
        announce(accelerator.state, f"epoch {progress.epoch}/{config.epochs}  step {progress.global_step}  test "
                                    f"accuracy {accuracy:.2%} ({evaluation['eval_samples']:,} images)  "
                                    f"elapsed {progress.elapsed_seconds:.1f} s")
        return predictions
    record = {
        "epoch": progress.epoch,
        "train_loss": progress.loss_sum / progress.batches_done,
        "test_accuracy": accuracy,
        "eval_samples": evaluation["eval_samples"],
        "train_seconds": progress.epoch_train_seconds,
        "train_images_per_second": progress.batches_done * config.batch_size / progress.epoch_train_seconds,
        "elapsed_seconds": progress.elapsed_seconds,
    }
    progress.epochs.append(record)
    accelerator.log({"train/images_per_second": record["train_images_per_second"]}, step=progress.global_step)
    announce(accelerator.state,
             f"epoch {progress.epoch}/{config.epochs}  train loss {record['train_loss']:.4f}  test accuracy "
             f"{accuracy:.2%} ({record['eval_samples']:,} images)  {record['train_seconds']:.1f} s training  "
             f"{record['train_images_per_second']:,.0f} images/s")
    return predictions
