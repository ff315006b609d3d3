"""What a run writes into its output directory, by rank 0 and atomically (in checkpoints/, every rank
also saves its own random-number state, see checkpoint.py).

    config.json            the resolved flags, written once the run has started (or resumed)
    checkpoints/           see checkpoint.py
    model.safetensors      the trained LeNet-5, plain names, config in its metadata
    predictions.png, training_curves.png, confusion_matrix.png, confident_mistakes.png
    metrics.json           written last: its presence marks the run finished
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

import lenet_dist
from lenet_dist.checkpoint import CHECKPOINTS_DIR, complete_checkpoints, export_weights
from lenet_dist.config import TrainConfig, default_run_dir
from lenet_dist.errors import NothingToDo, UsageError, UserError
from lenet_dist.files import write_json
from lenet_dist.processes import agree_on_any

METRICS_FILE = "metrics.json"


def claim_output_dir(state: PartialState, config: TrainConfig) -> Path:
    """Rank 0 picks the directory (a timestamp would differ across ranks), checks it, and tells the others."""
    chosen = [str(config.output_dir or default_run_dir())]
    broadcast_object_list(chosen, from_process=0)
    output_dir = Path(chosen[0])
    agree_on_any(_check_output_dir(output_dir, config) if state.is_main_process else None)
    return output_dir


def _check_output_dir(output_dir: Path, config: TrainConfig) -> UserError | None:
    if (output_dir / METRICS_FILE).exists() and not config.overwrite:
        if config.resume == "auto":  # a requeued job that already finished: success, nothing to redo
            return NothingToDo(f"{output_dir} holds a finished run: nothing to resume (--resume auto)")
        return UsageError(
            f"--output-dir {output_dir} already holds a finished run; pass --overwrite or another --output-dir"
        )
    if complete_checkpoints(output_dir) and not config.resume and not config.overwrite:
        return UsageError(
            f"--output-dir {output_dir} holds the checkpoints of an unfinished run; continue it with --resume "
            "(or --resume auto), or pass --overwrite to start again"
        )
    try:
        if config.overwrite and not config.resume:
            shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        return UserError(f"--output-dir {output_dir} is not writable ({error.strerror}); choose another --output-dir")
    return None


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
