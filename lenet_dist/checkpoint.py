"""Checkpoints (atomic, resumable) and the exported weights.

Exported weights are safetensors only, so loading a model never unpickles anything; accelerate's
load_state reads optimizer and scheduler states with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lenet_dist.config import option
from lenet_dist.errors import UserError
from lenet_dist.model import LeNet5

WEIGHTS_FILE = "model.safetensors"


def export_weights(model: torch.nn.Module, run_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write the plain LeNet-5 state dict (no DDP `module.` or compile `_orig_mod.` prefixes) atomically."""
    path = run_dir / WEIGHTS_FILE
    partial = path.with_name(path.name + ".partial")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(partial), metadata={key: json.dumps(value) for key, value in metadata.items()})
    partial.replace(path)
    return path


def load_model(run_dir_or_file: Path) -> tuple[LeNet5, dict[str, Any]]:
    """A LeNet-5 from a run directory (or its model.safetensors), with the metadata saved beside it."""
    path = run_dir_or_file / WEIGHTS_FILE if run_dir_or_file.is_dir() else run_dir_or_file
    if not path.is_file():
        raise UserError(f"no {WEIGHTS_FILE} in {run_dir_or_file}; pass a finished training run's output dir")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); re-export it") from None
    model = LeNet5(num_classes=int(metadata.get("num_classes", 10)))
    try:
        model.load_state_dict(tensors)
    except RuntimeError:
        raise UserError(f"{path} does not hold LeNet-5 weights (names or shapes differ)") from None
    return model.eval(), metadata


CHECKPOINTS_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# The config fields that decide the training trajectory: resuming with any other value would not
# continue the same run.
TRAJECTORY_FIELDS = ("epochs", "batch_size", "lr", "schedule", "seed")


@dataclass
class Progress:
    """Where training stands: saved with every checkpoint, restored on --resume."""

    epoch: int = 1  # the epoch in progress, 1-based
    batches_done: int = 0  # batches of that epoch already trained
    global_step: int = 0
    loss_sum: float = 0.0  # sum of that epoch's batch losses so far
    epochs: list[dict[str, Any]] = field(default_factory=list)  # finished epochs' records
    trajectory: dict[str, Any] = field(default_factory=dict)


def trajectory_of(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in TRAJECTORY_FIELDS}


def save_checkpoint(accelerator: Accelerator, run_dir: Path, progress: Progress, keep: int) -> Path:
    """accelerate's save_state into a hidden folder, renamed into place only once complete.

    A SIGKILL at any instant leaves either the previous checkpoints alone or the new one complete:
    rename is atomic, and progress.json, written last, marks a folder as complete.
    """
    folder = run_dir / CHECKPOINTS_DIR
    final = folder / f"step-{progress.global_step:08d}"
    partial = folder / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every rank: rank 0 the weights, each rank its RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a step checkpoint and an epoch-end one can coincide
        partial.rename(final)
        for stale in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale)
        for leftover in folder.glob(".step-*.partial"):  # from a run killed while saving
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.match(p.name) and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def find_checkpoint(resume: str, run_dir: Path) -> Path:
    if resume != "latest":
        return Path(resume)
    found = complete_checkpoints(run_dir)
    if not found:
        raise UserError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS_DIR}; pass --resume PATH or drop --resume")
    return found[-1]


def restore_checkpoint(accelerator: Accelerator, checkpoint: Path, config: Any) -> Progress:
    """Load model, optimizer, scheduler and RNG states; refuse a checkpoint of a different run."""
    try:
        progress = Progress(**json.loads((checkpoint / PROGRESS_FILE).read_text()))
    except FileNotFoundError:
        raise UserError(f"--resume {checkpoint}: not a checkpoint folder (no {PROGRESS_FILE})") from None
    except (json.JSONDecodeError, TypeError) as error:
        raise UserError(f"--resume {checkpoint}: {PROGRESS_FILE} is corrupt ({error}); use an older checkpoint") from None
    differing = [
        f"{option(name)} {value} (this run: {getattr(config, name)})"
        for name, value in progress.trajectory.items() if getattr(config, name) != value
    ]
    if differing:
        raise UserError(f"--resume {checkpoint} comes from a different config: {', '.join(differing)}")
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # any unreadable piece means the same thing to the user
        raise UserError(
            f"--resume {checkpoint}: checkpoint is corrupt ({type(error).__name__}); use an older checkpoint"
        ) from None
    return progress
