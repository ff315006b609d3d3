"""The one place every training flag is defined; the command line is generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lenet_dist.errors import UserError

DATA_DIR_ENV = "LENET_DATA_DIR"


def flag(
    default: Any, doc: str, *, short: str | None = None, choices: tuple[str, ...] | None = None,
    bare: Any = None, positional: bool = False,
) -> Any:
    """A dataclass field that also carries what argparse needs to expose it.

    `bare` is the value the flag takes when given without an argument (`--resume` → "latest").
    """
    metadata = {"help": doc, "short": short, "choices": choices, "bare": bare, "positional": positional}
    return field(default=default, metadata=metadata)


def option(name: str) -> str:
    """The command-line spelling of a config field: `batch_size` → `--batch-size`."""
    return "--" + name.replace("_", "-")


def require_at_least(config: Any, minimums: dict[str, int]) -> None:
    """Refuse, in one line, the first flag below its minimum (None means "use the default" and passes)."""
    for name, least in minimums.items():
        value = getattr(config, name)
        if value is not None and value < least:
            raise UserError(f"{option(name)} must be at least {least}, got {value}")


@dataclass
class TrainConfig:
    epochs: int = flag(2, "passes over the training set")
    batch_size: int = flag(
        128,
        "GLOBAL batch size, split evenly across processes, so 1 and N processes follow the same recipe",
        short="-b",
    )
    lr: float = flag(3e-3, "peak learning rate of Adam (the one-cycle schedule's maximum)")
    schedule: str = flag("onecycle", "learning-rate schedule", choices=("onecycle", "constant"))
    seed: int = flag(0, "seed for weights and data order")
    deterministic: bool = flag(
        False, "also make GPU kernels deterministic (torch.use_deterministic_algorithms); CPU runs already repeat exactly"
    )
    data_dir: str | None = flag(
        None, f"folder holding MNIST/raw/*-ubyte (default: ${DATA_DIR_ENV}, else ./data; downloaded if missing)"
    )
    output_dir: str | None = flag(None, "where metrics.json and figures go (default: runs/<timestamp>)")
    dataset: str = flag("mnist", "which MNIST-format data set", choices=("mnist", "fashion-mnist", "kmnist"))
    data_pipeline: str = flag(
        "tensor",
        "tensor: MNIST held as one uint8 tensor on the training device, batches gathered by index; "
        "torchvision: the seed's per-image ToTensor/Normalize DataLoader",
        choices=("tensor", "torchvision"),
    )
    workers: int | None = flag(
        None, "DataLoader worker processes (default: 0 for the tensor pipeline, 2 for torchvision)", short="-j"
    )
    pin_memory: bool | None = flag(None, "pin host batches for the copy to the GPU (default: on for torchvision + CUDA)")
    persistent_workers: bool = flag(True, "keep DataLoader workers alive between epochs (when --workers > 0)")
    pin_cores: bool = flag(
        True, "in multi-process CPU runs, give each local process its own slice of this machine's cores"
    )
    mixed_precision: str | None = flag(
        None, "autocast precision (default: accelerate's config or --mixed_precision flag, else no)",
        choices=("no", "bf16", "fp16"),
    )
    compile: bool = flag(False, "torch.compile the model through accelerate's dynamo plugin (inductor)")
    channels_last: bool = flag(
        True, "keep convolution weights and activations channels-last (oneDNN's fast layout on CPU)"
    )
    target_accuracy: float | None = flag(None, "stop once the test accuracy reaches this fraction, e.g. 0.98")
    checkpoint_every: int = flag(0, "also checkpoint every N training steps (0: only at each epoch end)")
    keep_checkpoints: int = flag(2, "how many of the newest checkpoints to keep in <output-dir>/checkpoints/")
    resume: str | None = flag(
        None, "resume from the newest checkpoint of --output-dir (bare --resume) or from a checkpoint folder",
        bare="latest",
    )
    overwrite: bool = flag(False, "train into an --output-dir that already holds a finished run, replacing it")
    progress: bool = flag(True, "a rich progress bar on a terminal (plain log lines otherwise or with --no-progress)")
    log_every: int = flag(10, "log the mean training loss every N steps (progress line, TensorBoard)")
    log_with: str | None = flag(None, "experiment tracker through accelerate, into the output dir", choices=("tensorboard",))
    show: bool = flag(False, "also open the predictions figure in a window, as the seed did")
    profile: bool = flag(False, "record torch.profiler traces of a window of training steps into --profile-dir/<run>/")
    profile_dir: str = flag("profiles", "where profiler traces go, one folder per run")
    profile_wait: int = flag(5, "profiler schedule: steps skipped before each recording cycle")
    profile_warmup: int = flag(2, "profiler schedule: steps traced but discarded while the profiler settles")
    profile_active: int = flag(5, "profiler schedule: steps recorded per cycle")
    profile_repeat: int = flag(1, "profiler schedule: recording cycles (one trace file per cycle and rank)")
    profile_flops: bool = flag(False, "also estimate FLOPs of matmuls and convolutions in the trace")

    def __post_init__(self) -> None:
        require_at_least(self, {
            "epochs": 1, "batch_size": 1, "keep_checkpoints": 1, "log_every": 1, "workers": 0,
            "profile_wait": 0, "profile_warmup": 0, "profile_active": 1, "profile_repeat": 1,
        })
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be 0 (epoch ends only) or more, got {self.checkpoint_every}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise UserError(f"--target-accuracy is a fraction in (0, 1], got {self.target_accuracy}")

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir or os.environ.get(DATA_DIR_ENV) or "data")

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 0 if self.data_pipeline == "tensor" else 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _scalar_type(annotation: Any) -> type:
    """`int | None` → int; argparse needs the concrete converter."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One `--kebab-case` option per dataclass field, with its default shown in --help."""
    hints = typing.get_type_hints(config_class)
    for config_field in dataclasses.fields(config_class):
        meta = config_field.metadata
        names = ([meta["short"]] if meta.get("short") else []) + [option(config_field.name)]
        if typing.get_origin(hints[config_field.name]) is list:  # positional, one or more
            parser.add_argument(config_field.name, nargs="*", metavar=config_field.name.upper()[:-1], help=meta["help"])
            continue
        kind = _scalar_type(hints[config_field.name])
        if meta.get("positional"):
            parser.add_argument(config_field.name, type=kind, metavar=config_field.name.upper(), help=meta["help"])
        elif kind is bool:
            parser.add_argument(
                *names, action=argparse.BooleanOptionalAction, default=config_field.default, help=meta["help"]
            )
        else:
            optional_value = {"nargs": "?", "const": meta["bare"]} if meta.get("bare") is not None else {}
            parser.add_argument(
                *names,
                type=kind,
                default=config_field.default,
                choices=meta.get("choices"),
                help=meta["help"] + " (default: %(default)s)",
                **optional_value,
            )


def config_from_args(config_class: type, args: argparse.Namespace) -> Any:
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def parse_config(config_class: type, argv: list[str] | None, prog: str | None, description: str) -> Any:
    parser = ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, config_class)
    return config_from_args(config_class, parser.parse_args(argv))


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, prog=None, description="Train LeNet-5 on MNIST through accelerate.")
