"""What a finished run writes (rank 0): its weights, figures and metrics.json, last, whose presence marks the
run finished. The folder itself, its lock and --overwrite: output_dir.py."""

from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import lenet_dist
from lenet_dist.cadence import Cadence, RunState
from lenet_dist.checkpoint import export_weights
from lenet_dist.files import write_json
from lenet_dist.output_dir import METRICS_FILE
from lenet_dist.recipe.build import Trainer


def versions() -> dict[str, str]:
    import accelerate

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "lenet_dist": lenet_dist.__version__,
    }


def write_run_outputs(
    output_dir: Path, metrics: dict[str, Any], model: torch.nn.Module, predictions: dict[str, torch.Tensor],
    test_images: torch.Tensor, classes: tuple[str, ...],
) -> list[Path]:
    """Everything a finished run leaves behind; metrics.json last, so its presence means all the rest is there."""
    from lenet_dist.figures import save_run_figures

    weights = export_weights(model, output_dir, {"config": metrics["config"], "num_classes": len(classes)})
    figures = save_run_figures(output_dir, metrics, predictions, test_images, classes)
    write_json(output_dir / METRICS_FILE, metrics)
    return [output_dir / METRICS_FILE, weights, *figures]


def run_metrics(trainer: Trainer, cadence: Cadence, progress: RunState, precision: str,
                cuda_graph: bool) -> dict[str, Any]:
    """What metrics.json holds, but for where the traces went; `precision` in words (precision_label)."""
    config, accelerator = trainer.config, trainer.accelerator
    reached = [e for e in progress.evaluations if cadence.meets_target(e)]
    return {
        "config": asdict(config),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "precision": precision,
        "cuda_graph": cuda_graph,
        "versions": versions(),
        "steps_per_epoch": len(trainer.batches),
        "epochs": progress.epochs,
        "train_log": progress.train_log,
        "evaluations": progress.evaluations,
        "final_test_accuracy": progress.evaluations[-1]["test_accuracy"],
        # the first evaluation at ≥ the target; False for a target that was missed, None without one
        "reached_target": reached[0] if reached else (False if config.target_accuracy is not None else None),
        "best_evaluation": max(progress.evaluations, key=lambda e: e["test_accuracy"]),
        "train_seconds": progress.train_seconds,
        "eval_seconds": progress.eval_seconds,
        "compile_seconds": progress.compile_seconds,
    }
