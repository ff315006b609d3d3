"""Checkpoints (atomic, resumable, portable across process counts) and the exported weights.

Exported weights are safetensors only, so loading a model never unpickles anything; accelerate's
load_state reads optimizer and scheduler states with torch.load(weights_only=True).

A checkpoint saved by N processes resumes on M: the global batch and each epoch's order depend on
neither (see data.ShuffledBatches), the model and optimizer states are the same on every rank, and
no random numbers are drawn after start-up.
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
from lenet_dist.errors import UsageError, UserError
from lenet_dist.files import is_write_failure, write_atomically, write_failure, write_json
from lenet_dist.model import LeNet5
from lenet_dist.processes import agree_on_any

WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
PROGRESS_FILE = "progress.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# The config fields that decide the training trajectory: resuming with any other value would not
# continue the same run. The number of processes is not one of them.
TRAJECTORY_FIELDS = ("epochs", "batch_size", "lr", "schedule", "warmup", "seed", "dataset", "data_pipeline")


@dataclass
class RunState:
    """Where training stands: saved with every checkpoint, restored on --resume."""

    epoch: int = 1  # the epoch in progress, 1-based
    batches_done: int = 0  # batches of that epoch already trained
    global_step: int = 0
    loss_sum: float = 0.0  # sum of that epoch's batch losses so far
    train_seconds: float = 0.0  # time spent training (this epoch's share is epoch_train_seconds)
    eval_seconds: float = 0.0  # time spent evaluating
    epoch_train_seconds: float = 0.0
    compile_seconds: float = 0.0  # --compile: compiling the graphs before the first step
    epochs: list[dict[str, Any]] = field(default_factory=list)  # finished epochs' records
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # every test-set evaluation
    trajectory: dict[str, Any] = field(default_factory=dict)
    processes: int = 1  # how many processes saved it (for the resume message only)

    @property
    def elapsed_seconds(self) -> float:
        return self.train_seconds + self.eval_seconds


def trajectory_of(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in TRAJECTORY_FIELDS}


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: RunState, keep: int) -> Path:
    """accelerate's save_state into a hidden folder, renamed into place only once complete.

    A SIGKILL at any instant leaves either the previous checkpoints alone or the new one complete:
    rename is atomic, and progress.json, written last, marks a folder as complete. A write that fails
    (a full disk, a file-size limit) on any rank is one error on every rank, and the partial folder goes.
    """
    folder = run_dir / CHECKPOINTS_DIR
    final = folder / f"step-{state.global_step:08d}"
    partial = folder / f".{final.name}.partial"
    problem = None
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
        except OSError as error:
            problem = UserError(write_failure(partial, error))
    agree_on_any(problem)
    try:
        accelerator.save_state(str(partial))  # every rank: rank 0 the weights, each rank its RNG state
        if accelerator.is_main_process:
            state.processes = accelerator.num_processes
            write_json(partial / PROGRESS_FILE, asdict(state))
    except UserError as error:
        problem = error
    except Exception as error:
        if not is_write_failure(error):
            raise
        problem = UserError(write_failure(final, error))
    try:
        agree_on_any(problem)
    except UserError:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if accelerator.is_main_process:
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


def checkpoint_to_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint --resume names: a folder, the newest in the run ("latest"), or the newest if any ("auto")."""
    if resume is None:
        return None
    if resume not in ("latest", "auto"):
        return Path(resume)
    found = complete_checkpoints(run_dir)
    if found:
        return found[-1]
    if resume == "auto":
        return None
    raise UsageError(
        f"--resume: no checkpoint in {run_dir / CHECKPOINTS_DIR}; pass --resume PATH, --resume auto, or drop --resume"
    )


def restore_checkpoint(accelerator: Accelerator, checkpoint: Path, config: Any) -> RunState:
    """Load model, optimizer, scheduler and RNG states; refuse a checkpoint of a different run."""
    try:
        state = RunState(**json.loads((checkpoint / PROGRESS_FILE).read_text()))
    except FileNotFoundError:
        raise UsageError(f"--resume {checkpoint}: not a checkpoint folder (no {PROGRESS_FILE})") from None
    except (json.JSONDecodeError, TypeError) as error:
        raise UserError(
            f"--resume {checkpoint}: {PROGRESS_FILE} is corrupt ({error}); use an older checkpoint"
        ) from None
    differing = [
        f"{option(name)} {value} (this run: {getattr(config, name)})"
        for name, value in state.trajectory.items() if getattr(config, name) != value
    ]
    if differing:
        raise UsageError(f"--resume {checkpoint} comes from a different config: {', '.join(differing)}")
    problem = None
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # any unreadable piece means the same thing to the user
        problem = UserError(
            f"--resume {checkpoint}: checkpoint is corrupt ({type(error).__name__}); use an older checkpoint"
        )
    agree_on_any(problem)  # one rank's unreadable file stops every rank, not just that one
    return state


def export_weights(model: torch.nn.Module, run_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write the plain LeNet-5 state dict (no DDP `module.` or compile `_orig_mod.` prefixes) atomically."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    text = {key: json.dumps(value) for key, value in metadata.items()}
    return write_atomically(run_dir / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata=text))


def load_model(run_dir_or_file: Path) -> tuple[LeNet5, dict[str, Any]]:
    """A LeNet-5 from a run directory (or its model.safetensors), with the metadata saved beside it."""
    path = run_dir_or_file / WEIGHTS_FILE if run_dir_or_file.is_dir() else run_dir_or_file
    if not path.is_file():
        raise UsageError(f"no {WEIGHTS_FILE} in {run_dir_or_file}; pass a finished training run's output dir")
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
