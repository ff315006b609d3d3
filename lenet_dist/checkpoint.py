"""Checkpoints (atomic, durable, resumable on any process count, node or device) and the exported weights.

A checkpoint is a folder `checkpoints/step-<N>/` that rank 0 alone writes:

    model.safetensors    the plain LeNet-5, as exported (predict reads it too)
    training_state.pt    optimizer, schedule (and fp16 scaler) states, CPU tensors only
    progress.json        where training stands (cadence.RunState); written last, it marks the folder complete

On resume the rank holding the chosen checkpoint sends it to every rank, so other nodes need no copy and
N processes resume on M (no per-rank random state exists after start-up). Loading never unpickles
arbitrary objects: safetensors for the weights, torch.load(weights_only=True) for the rest.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save_file

from lenet_dist.cadence import RunState
from lenet_dist.errors import UsageError, UserError, on_every_rank
from lenet_dist.files import follow_umask, fsync_folder, is_write_failure, write_atomically, write_failure
from lenet_dist.flags import option
from lenet_dist.model import LeNet5, unwrapped

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
RUN_CONFIG_FILE = "config.json"  # in the run dir: the flags and the run id, written when the run starts
CHECKPOINT_FILES = (WEIGHTS_FILE, STATE_FILE, PROGRESS_FILE)
CHECKPOINTS_DIR = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# Optimizer settings that say how this run steps, not where it stands: a checkpoint's must not replace them.
STEPPING_SETTINGS = ("capturable", "fused", "foreach", "differentiable")


class Trained(Protocol):
    """What a checkpoint holds the state of (recipe.Trainer)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler


def save_checkpoint(trained: Trained, run_dir: Path, state: RunState, keep: int) -> Path:
    """Rank 0 writes the checkpoint into a hidden folder, fsyncs it and renames it into place.

    A kill at any instant leaves the previous checkpoints or the new one complete. A failed write is one
    error on every rank, and the partial folder goes.
    """
    accelerator = trained.accelerator
    folder = run_dir / CHECKPOINTS_DIR
    final = folder / f"step-{state.global_step:08d}"
    if accelerator.is_main_process:
        state.processes = accelerator.num_processes
    on_every_rank(lambda: _write_checkpoint(trained, folder, final, state, keep) if accelerator.is_main_process
                  else None)
    return final


def _write_checkpoint(trained: Trained, folder: Path, final: Path, state: RunState, keep: int) -> None:
    partial = folder / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        model = unwrapped(trained.model)
        save_file(_cpu_tensors(model.state_dict()), str(partial / WEIGHTS_FILE), metadata=_weights_metadata(model))
        follow_umask(partial / WEIGHTS_FILE)
        torch.save(_training_state(trained), partial / STATE_FILE)
        (partial / PROGRESS_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        fsync_folder(partial)
    except Exception as error:
        shutil.rmtree(partial, ignore_errors=True)
        if is_write_failure(error):
            raise UserError(write_failure(final, error)) from None
        raise
    shutil.rmtree(final, ignore_errors=True)  # a step checkpoint and an epoch-end one can coincide
    partial.rename(final)
    fsync_folder(folder, files=False)  # the rename itself, durable
    for stale in complete_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(stale)
    for leftover in folder.glob(".step-*.partial"):  # from a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)


def _training_state(trained: Trained) -> dict[str, Any]:
    """The optimizer's and schedule's states on the CPU, learning rates as numbers: a CUDA graph keeps them
    as GPU tensors, which a machine without that GPU could not load."""
    optimizer = trained.optimizer.state_dict()
    optimizer["param_groups"] = [_plain_numbers(group) for group in optimizer["param_groups"]]
    # strides kept: fused Adam pairs moments with parameters in memory order (channels-last stays so)
    optimizer["state"] = {key: {name: tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor
                                for name, tensor in value.items()} for key, value in optimizer["state"].items()}
    training_state = {"optimizer": optimizer, "scheduler": _plain_numbers(trained.lr_scheduler.state_dict())}
    scaler = trained.accelerator.scaler
    if scaler is not None:
        training_state["scaler"] = _plain_numbers(scaler.state_dict())
    return training_state


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as safetensors stores it: CPU tensors in the standard (contiguous) layout."""
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def _plain_numbers(value: Any) -> Any:
    """One-element tensors as Python numbers, recursively (the rest of a schedule's state is numbers already)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {key: _plain_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_numbers(item) for item in value)
    return value


def newest_checkpoint(run_dir: Path, rank: int, rank_0_host: str) -> str:
    """Where the job can resume from, as this rank can tell (rank 0 alone writes checkpoints, on its disk)."""
    found = complete_checkpoints(run_dir)
    if found:
        return f"the newest checkpoint is {found[-1]}"
    if rank:
        return f"checkpoints are on {rank_0_host}, rank 0's node"
    return "no checkpoint was saved yet"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


class CorruptCheckpoint(UserError):
    """A checkpoint whose files cannot be read: --resume auto sets it aside and takes the one before it."""


@dataclass(frozen=True)
class Choice:
    """The checkpoint the whole job resumes from, and the rank whose disk holds it."""

    path: Path
    holder: int


def restore_checkpoint(trained: Trained, choice: Choice, config: Any) -> RunState:
    """Load model, optimizer, schedule (and scaler) states on every rank from the holder's files; refuse a
    checkpoint of a different run."""
    accelerator = trained.accelerator
    files = [_read_checkpoint(choice.path) if accelerator.process_index == choice.holder else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(files, from_process=choice.holder)
    (payload,) = files
    if isinstance(payload, UserError):
        raise payload
    state = _parse_progress(choice.path, payload[PROGRESS_FILE])
    differing = [
        f"{option(name)} {value} (this run: {getattr(config, name)})"
        for name, value in state.trajectory.items() if getattr(config, name) != value
    ]
    if differing:
        raise UsageError(f"--resume {choice.path} comes from a different config: {', '.join(differing)}; to train "
                         f"on from its weights with a new recipe, start a new run with --init-from {choice.path}")
    try:
        weights = load(payload[WEIGHTS_FILE])
        training_state = torch.load(io.BytesIO(payload[STATE_FILE]), map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError) as error:
        raise CorruptCheckpoint(f"--resume {choice.path}: checkpoint is corrupt ({type(error).__name__}); use an "
                                "older checkpoint") from None
    try:
        unwrapped(trained.model).load_state_dict(weights)
        load_optimizer_state(trained.optimizer, training_state["optimizer"])
        trained.lr_scheduler.load_state_dict(training_state["scheduler"])
        if accelerator.scaler is not None and "scaler" in training_state:
            accelerator.scaler.load_state_dict(training_state["scaler"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"--resume {choice.path}: the checkpoint does not fit this run's model or optimizer "
                        f"({str(error).splitlines()[0]})") from None
    return state


def initialize_from(trained: Trained, source: Path) -> None:
    """--init-from: another run's weights (its output dir or a checkpoint folder) into this run's model, on every
    rank from its own disk; the optimizer and the schedule start afresh."""
    model = unwrapped(trained.model)
    try:
        weights, metadata = load_model(source)
    except UserError as error:
        raise type(error)(f"--init-from: {error}") from None
    if int(metadata.get("num_classes", 10)) != model.num_classes:
        raise UsageError(f"--init-from {source}: its model has {metadata.get('num_classes')} classes, this run's "
                         f"data set {model.num_classes}")
    model.load_state_dict(weights.state_dict())


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Optimizer.load_state_dict, keeping this optimizer's STEPPING_SETTINGS: otherwise an eager run's
    checkpoint would turn off the capturable Adam a CUDA graph needs."""
    settings = [{key: group[key] for key in STEPPING_SETTINGS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, kept in zip(optimizer.param_groups, settings, strict=True):
        group.update(kept)
        for parameter in group["params"]:  # fused Adam pairs a moment with its weight in memory order
            state = optimizer.state.get(parameter, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and \
                        value.stride() != parameter.stride():  # saved by a run of the other --channels-last
                    state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
        if group.get("capturable") or group.get("fused"):  # their step counts live beside the parameters
            for parameter in group["params"]:
                step = optimizer.state.get(parameter, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device != parameter.device:
                    optimizer.state[parameter]["step"] = step.to(parameter.device, torch.float32)


def _read_checkpoint(path: Path) -> dict[str, bytes] | UserError:
    """The checkpoint's files as bytes (a problem is returned, to reach every rank, not raised)."""
    if not (path / PROGRESS_FILE).is_file():
        return UsageError(f"--resume {path}: not a checkpoint folder (no {PROGRESS_FILE})")
    try:
        return {name: (path / name).read_bytes() for name in CHECKPOINT_FILES}
    except OSError as error:
        return CorruptCheckpoint(f"--resume {path}: cannot read {error.filename} ({error.strerror}); use an older "
                                 "checkpoint")


def _parse_progress(path: Path, text: bytes) -> RunState:
    try:
        return RunState(**json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
        raise CorruptCheckpoint(f"--resume {path}: {PROGRESS_FILE} is corrupt ({error}); use an older "
                                "checkpoint") from None


def _weights_metadata(model: torch.nn.Module) -> dict[str, str]:
    return {"num_classes": json.dumps(model.num_classes)}


def export_weights(model: torch.nn.Module, run_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write the plain LeNet-5 state dict (no DDP `module.` or compile `_orig_mod.` prefixes) atomically."""
    tensors = _cpu_tensors(model.state_dict())
    text = {key: json.dumps(value) for key, value in metadata.items()}
    return write_atomically(run_dir / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata=text))


def load_model(run_dir_or_file: Path) -> tuple[LeNet5, dict[str, Any]]:
    """A LeNet-5 from a run directory (or its model.safetensors), with the metadata saved beside it."""
    path = run_dir_or_file / WEIGHTS_FILE if run_dir_or_file.is_dir() else run_dir_or_file
    if not path.is_file():
        newest = complete_checkpoints(run_dir_or_file)[-1:] if run_dir_or_file.is_dir() else []
        if newest:
            raise UsageError(f"no {WEIGHTS_FILE} in {run_dir_or_file}: its run has not finished; its checkpoints "
                             f"hold weights too, the newest: {newest[0]}")
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
