"""Every command's flags, one dataclass each, the command line generated from them; no heavy imports, for --help."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lenet_dist.errors import UsageError
from lenet_dist.flags import UNSET, flag, option, parse_config, require_at_least, require_choices, split_list

DATA_DIR_ENV = "LENET_DATA_DIR"
DATASET_NAMES = ("mnist", "fashion-mnist", "kmnist")  # their files and statistics: data.DATASETS
TEST_IMAGES = 10_000  # the test split of each of them
# accelerate.utils.LoggerType's names, spelled here to keep accelerate out; a test keeps the two equal.
TRACKERS = ("aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")


# The recipes --recipe names: every field a recipe sets, which a flag given on its own overrides.
#   default     MNIST's test set in 2 epochs: Adam, one-cycle over both, 98.6 % and more (BENCHMARKS.md)
#   fast-to-98  fewest seconds to 98 % in at most 30,000 images: Muon (Adam on the biases and the output layer),
#               LeCun init, batch 64, the learning rate annealed over the first 45,056 images to a fiftieth of its
#               peak and then held (so a slow seed still learns), stopping at the first evaluation ≥ 98 %
#               (scripts/recipe_search.py --stage seconds)
#   predict     for reading your own handwriting (`lenet-dist predict`): the default's Adam and schedule over 5
#               epochs, each batch redrawn as other hands and pens write (--augment, augment.py)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"epochs": 2, "batch_size": 128, "lr": 6e-3, "warmup": 0.3, "anneal_images": None,
                "final_lr_factor": 1 / 25 / 1e4, "init": "pytorch", "target_accuracy": None, "optimizer": "adam",
                "muon_lr": 0.02, "augment": False},
    "fast-to-98": {"epochs": 1, "batch_size": 64, "lr": 5e-3, "warmup": 0.1, "anneal_images": 45_056,
                   "final_lr_factor": 1 / 50, "init": "lecun", "target_accuracy": 0.98, "optimizer": "muon",
                   "muon_lr": 0.015, "augment": False},
    "predict": {"epochs": 5, "batch_size": 128, "lr": 6e-3, "warmup": 0.3, "anneal_images": None,
                "final_lr_factor": 1 / 25 / 1e4, "init": "pytorch", "target_accuracy": None, "optimizer": "adam",
                "muon_lr": 0.02, "augment": True},
}


def from_recipe(name: str) -> str:
    """The help's default for a flag that a recipe sets: the default recipe's value."""
    value = RECIPES["default"][name]
    shown = ("on" if value else "off") if isinstance(value, bool) else "none" if value is None else value
    return f"(default: {shown}, from --recipe default)"


def resolve_data_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data")


@dataclass
class TrainConfig:
    recipe: str = flag(
        "default", "a whole recipe: default (Adam, 2 epochs; for MNIST's test set), fast-to-98 (Muon, one epoch; "
        "the fewest images to 98 %) or predict (--augment, 5 epochs: for reading your own handwriting); the flags "
        "below whose default says 'from --recipe default' override their part of any recipe", choices=tuple(RECIPES),
        trajectory=False,
    )
    epochs: int = flag(UNSET, f"passes over the training set {from_recipe('epochs')}", trajectory=True)
    batch_size: int = flag(
        UNSET,
        "GLOBAL batch size, split evenly across processes, so 1 and N processes follow the same recipe "
        f"{from_recipe('batch_size')}",
        short="-b", trajectory=True,
    )
    lr: float = flag(
        UNSET, f"peak learning rate of Adam (the one-cycle schedule's maximum) {from_recipe('lr')}", trajectory=True,
    )
    optimizer: str = flag(
        UNSET, f"adam, or muon: Muon on the four weight matrices (the convolutions' filters flattened), Adam (--lr) on "
        f"the biases and the output layer {from_recipe('optimizer')}", choices=("adam", "muon"), trajectory=True,
    )
    muon_lr: float = flag(
        UNSET, f"--optimizer muon: Muon's peak learning rate {from_recipe('muon_lr')}", trajectory=True,
    )
    schedule: str = flag("onecycle", "learning-rate schedule", choices=("onecycle", "constant"), trajectory=True)
    warmup: float = flag(
        UNSET, "one-cycle schedule: the share of its cycle spent raising the learning rate to its peak "
        f"{from_recipe('warmup')}",
        trajectory=True,
    )
    anneal_images: int | None = flag(
        UNSET, "one-cycle schedule: the images its cycle spans, after which the learning rate holds its last value "
        f"(none: the whole run) {from_recipe('anneal_images')}", trajectory=True
    )
    final_lr_factor: float = flag(
        UNSET, "one-cycle schedule: the learning rate its cycle ends on, and then holds, as a fraction of the peak "
        f"(OneCycleLR's: 1/250000) {from_recipe('final_lr_factor')}", trajectory=True
    )
    init: str = flag(
        UNSET, f"weight initialisation: pytorch (its default) or lecun (normal, std 1/√fan-in) {from_recipe('init')}",
        choices=("pytorch", "lecun"), trajectory=True,
    )
    augment: bool = flag(
        UNSET, "redraw each training batch with small random rotations, scalings, slants, shifts and thicker or "
        f"thinner strokes, as other hands and pens write (the tensor pipeline) {from_recipe('augment')}",
        trajectory=True,
    )
    seed: int = flag(0, "seed for weights and data order", trajectory=True)
    deterministic: bool = flag(
        False,
        "also make GPU kernels deterministic (torch.use_deterministic_algorithms); CPU runs already repeat exactly",
        trajectory=False,
    )
    data_dir: str | None = flag(
        None, f"folder holding MNIST/raw/*-ubyte (default: ${DATA_DIR_ENV}, else ./data; downloaded if missing)",
        trajectory=False,
    )
    output_dir: str | None = flag(
        None, "where metrics.json and figures go (default: runs/<timestamp>)", trajectory=False,
    )
    dataset: str = flag("mnist", "which MNIST-format data set", choices=DATASET_NAMES, trajectory=True)
    data_pipeline: str = flag(
        "tensor",
        "tensor: the data set held as one uint8 tensor on the training device, batches gathered by index; "
        "torchvision: the original script's per-image ToTensor/Normalize DataLoader",
        choices=("tensor", "torchvision"), trajectory=True,
    )
    workers: int | None = flag(
        None, "DataLoader worker processes (default: 0 for the tensor pipeline, 2 for torchvision)", short="-j",
        trajectory=False,
    )
    pin_memory: bool | None = flag(
        None, "pin host batches for the copy to the GPU (default: on for torchvision + CUDA)", trajectory=False
    )
    persistent_workers: bool = flag(
        True, "keep DataLoader workers alive between epochs (when --workers > 0)", trajectory=False,
    )
    pin_cores: bool = flag(
        True, "in multi-process CPU runs, give each local process its own slice of this machine's cores",
        trajectory=False,
    )
    mixed_precision: str | None = flag(
        None, "autocast precision (default: accelerate's config or --mixed_precision flag, else no)",
        choices=("no", "bf16", "fp16"), trajectory=False,
    )
    compile: bool = flag(
        False, "torch.compile the model through accelerate's dynamo plugin (inductor)", trajectory=False,
    )
    cuda_graph: bool | None = flag(
        None, "capture the training step as one CUDA graph (default: on with one CUDA GPU and the tensor pipeline; "
        "not under DDP, with fp16 or compiled)", trajectory=False
    )
    channels_last: bool = flag(
        True, "keep convolution weights and activations channels-last (oneDNN's fast layout on CPU)", trajectory=False
    )
    target_accuracy: float | None = flag(
        UNSET, "stop at the first evaluation whose test accuracy reaches this fraction, e.g. 0.98 "
        f"{from_recipe('target_accuracy')}",
        trajectory=False,
    )
    eval_every: int | None = flag(
        None, "evaluate on the whole test set every N steps (default: at each epoch's end; with --target-accuracy "
        "also in between, more often as the accuracy nears the target)", trajectory=False
    )
    collective_timeout: float = flag(
        120, "seconds a rank waits for the others in any collective before the job stops and names the rank it "
        "lost (a dead node or link); raise it where a first download or a cold --compile takes longer", trajectory=False
    )
    checkpoint_every: int = flag(
        0, "also checkpoint every N training steps (0: only at each epoch end)", trajectory=False,
    )
    keep_checkpoints: int = flag(
        2, "how many of the newest checkpoints to keep in <output-dir>/checkpoints/", trajectory=False,
    )
    resume: str | None = flag(
        None, "resume from the newest checkpoint of --output-dir (bare --resume), from a checkpoint folder, or "
        "auto: the newest checkpoint if there is one, else start afresh (for requeued jobs)",
        bare="latest", trajectory=False,
    )
    overwrite: bool = flag(
        False, "train into an --output-dir that already holds a finished run, replacing it", trajectory=False,
    )
    init_from: str | None = flag(
        None, "start from the weights of another run (its output dir, or one of its checkpoint folders), with a "
        "fresh optimizer and schedule: to train further, or to fine-tune, e.g. MNIST → Fashion-MNIST", trajectory=True
    )
    progress: bool = flag(
        True, "a rich progress bar on a terminal (plain log lines otherwise or with --no-progress)", trajectory=False,
    )
    log_every: int = flag(10, "log the mean training loss every N steps (progress line, trackers)", trajectory=False)
    log_with: str | None = flag(
        None, f"experiment trackers through accelerate, comma-separated, into the output dir: {', '.join(TRACKERS)}, "
        "or all (every installed one)", trajectory=False
    )
    show: bool = flag(
        False, "also open the predictions figure in a window, as the original script did", trajectory=False,
    )
    profile: bool = flag(
        False, "record torch.profiler traces of a window of training steps into --profile-dir/<run>/", trajectory=False,
    )
    profile_dir: str = flag("profiles", "where profiler traces go, one folder per run", trajectory=False)
    profile_wait: int = flag(5, "profiler schedule: steps skipped before each recording cycle", trajectory=False)
    profile_warmup: int = flag(
        2, "profiler schedule: steps traced but discarded while the profiler settles", trajectory=False,
    )
    profile_active: int = flag(5, "profiler schedule: steps recorded per cycle", trajectory=False)
    profile_repeat: int = flag(
        1, "profiler schedule: recording cycles (one trace file per cycle and rank)", trajectory=False,
    )
    profile_flops: bool = flag(False, "also estimate FLOPs of matmuls and convolutions in the trace", trajectory=False)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise UsageError(f"--recipe: unknown {self.recipe}; choose from {', '.join(RECIPES)}")
        for name, value in RECIPES[self.recipe].items():  # the recipe fills what no flag set
            if getattr(self, name) is UNSET:
                setattr(self, name, value)
        require_at_least(self, {
            "epochs": 1, "batch_size": 1, "keep_checkpoints": 1, "log_every": 1, "workers": 0, "eval_every": 1,
            "profile_wait": 0, "profile_warmup": 0, "profile_active": 1, "profile_repeat": 1, "anneal_images": 1,
        })
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be in 0 … 2**32 - 1 (4294967295), got {self.seed}")
        for name in ("lr", "muon_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UsageError(f"{option(name)} must be a positive number, got {getattr(self, name)}")
        if not 0 < self.final_lr_factor <= 1:
            raise UsageError(f"--final-lr-factor is a fraction of the peak in (0, 1], got {self.final_lr_factor}")
        if not 0 < self.warmup < 1:
            raise UsageError(f"--warmup is a fraction of the run in (0, 1), got {self.warmup}")
        if not (math.isfinite(self.collective_timeout) and self.collective_timeout > 0):
            raise UsageError(f"--collective-timeout is a number of seconds above 0, got {self.collective_timeout}")
        if self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every must be 0 (epoch ends only) or more, got {self.checkpoint_every}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise UsageError(f"--target-accuracy is a fraction in (0, 1], got {self.target_accuracy}")
        if self.augment and self.data_pipeline != "tensor":
            raise UsageError("--augment redraws the tensor pipeline's batches; drop --data-pipeline torchvision")
        require_choices("log_with", self.log_with, (*TRACKERS, "all"))

    def resolved_data_dir(self) -> Path:
        return resolve_data_dir(self.data_dir)

    def trajectory(self) -> dict[str, Any]:
        """What a resume must keep equal: the values of the flags declared trajectory=True."""
        return {name: getattr(self, name) for name in TRAJECTORY_FIELDS}

    def resolved_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 0 if self.data_pipeline == "tensor" else 2

    def trackers(self) -> list[str]:
        return split_list(self.log_with)



# What a resume must keep equal to the checkpoint's run (TrainConfig.trajectory): the flags declared with
# trajectory=True. How many processes ran is no flag, and not one of them.
TRAJECTORY_FIELDS = tuple(field.name for field in fields(TrainConfig) if field.metadata["trajectory"])

@dataclass
class BenchConfig:
    quick: bool = flag(False, "a small matrix that runs in about a minute: cpu, fp32, eager, batch 64 and 128, one "
                              "round, no training runs (each of those defaults can still be overridden)")
    devices: str | None = flag(None, "comma-separated devices (default: cpu and every cuda:N)")
    pipelines: str = flag(
        "original,tuned",
        "comma-separated: original (the original script: torchvision's per-image pipeline, contiguous model, "
        "foreach Adam), tuned (lenet-dist train's: in-memory data, channels-last model, fused Adam)",
    )
    precisions: str | None = flag(
        None, "comma-separated: no,bf16,fp16 (default: no,bf16, and fp16 on CUDA; no with --quick)"
    )
    compile_modes: str | None = flag(None, "comma-separated: eager,compile (default: both; eager with --quick)")
    batch_sizes: str | None = flag(None, "comma-separated batch sizes (default: 64,128,512; 64,128 with --quick)")
    windows: int = flag(5, "timed windows per measurement (the median is reported)")
    rounds: int | None = flag(None, "passes over the whole matrix; each row reports the median of its passes "
                                    "(default: 3; 1 with --quick)")
    window_images: int | None = flag(None, "images per timed window, at least 4 batches (default: 8192; 2048 "
                                           "with --quick)")
    runs: bool | None = flag(
        None, "also time real training commands: whole-process seconds of the default run and of the original "
        "script, time to 98% over --seeds seeds, and (with compile among --compile-modes) compile seconds cold "
        "and warm (default: on; off with --quick)"
    )
    repeats: int = flag(3, "runs of the original script (seeds 0, 1, …), alternating with the recipe's")
    seeds: int = flag(5, "seeds of the recipes' runs, default and fast-to-98 (medians and spreads are reported)")
    recipe_processes: str | None = flag(
        None, "comma-separated process counts the recipe's runs use (default: 1, and 2 where there are two cores "
        "or GPUs)"
    )
    processes: str | None = flag(
        None, "comma-separated process counts for the scaling sweep, e.g. 1,2,4 (default: 1 and 2 where there are "
        "two cores or GPUs; none with --quick)"
    )
    oversubscribe: bool = flag(False, "allow more processes than this machine has cores (CPU) or GPUs")
    data_dir: str | None = flag(None, f"MNIST folder (default: ${DATA_DIR_ENV}, else ./data)")
    json: str | None = flag(None, "write every row and the machine description here")
    chart: str | None = flag(None, "write PNG charts here (training images/s; the scaling sweep beside it)")
    profile: bool = flag(False, "profile the default recipe's row on each device into --profile-dir/bench-<time>/")
    profile_dir: str = flag("profiles", "where profiler traces go")

    def __post_init__(self) -> None:
        quick = self.quick
        for name, full, small in (
            ("precisions", None, "no"), ("compile_modes", "eager,compile", "eager"),
            ("batch_sizes", "64,128,512", "64,128"), ("rounds", 3, 1), ("window_images", 8192, 2048),
            ("runs", True, False), ("processes", None, ""),
        ):
            if getattr(self, name) is None:
                setattr(self, name, small if quick else full)
        require_at_least(self, {"windows": 5, "rounds": 1, "repeats": 1, "seeds": 1, "window_images": 1})
        require_choices("pipelines", self.pipelines, ("original", "tuned"))
        require_choices("compile_modes", self.compile_modes, ("eager", "compile"))
        require_choices("precisions", self.precisions, ("no", "bf16", "fp16"))
        for name in ("batch_sizes", "processes", "recipe_processes"):
            if not all(value.isdigit() and int(value) > 0 for value in split_list(getattr(self, name))):
                raise UsageError(f"{option(name)} takes positive whole numbers separated by commas, "
                                 f"got {getattr(self, name)!r}")
        if max(int(size) for size in split_list(self.batch_sizes)) > TEST_IMAGES:
            raise UsageError(f"--batch-sizes goes up to {TEST_IMAGES}: each row also times whole batches of the "
                             f"{TEST_IMAGES:,} test images")


@dataclass
class CompareConfig:
    results: list[str] = flag([], "bench --json files, the first one the baseline of the ratios", metavar="RESULT")
    chart: str | None = flag(None, "write a PNG chart of the matched rows here")
    json: str | None = flag(None, "also write the comparison as JSON here")

    def __post_init__(self) -> None:
        if len(self.results) < 2:
            raise UsageError("pass at least two bench --json files to compare")


@dataclass
class InspectConfig:
    run_dirs: list[str] = flag(
        [], "a run's output folder (its metrics.json records where its traces went), a folder of "
        "rank<N>.*.pt.trace.json[.gz] files, or one such file; a second one is compared with it (B against A)",
        metavar="RUN",
    )
    top: int = flag(12, "how many operators to list")
    json: str | None = flag(None, "also write the report as JSON here ('-' for stdout only, no table)")

    def __post_init__(self) -> None:
        require_at_least(self, {"top": 1})
        if not 1 <= len(self.run_dirs) <= 2:
            raise UsageError(f"pass one run, trace folder or trace file, or two to compare (A B), got "
                             f"{len(self.run_dirs)}: lenet-dist inspect RUN [OTHER-RUN]")


@dataclass
class PredictConfig:
    model: str = flag("", "a training run's output dir, or one of its checkpoints (RUN_DIR/checkpoints/step-N)",
                      required=True, metavar="RUN_DIR")
    images: list[str] = flag([], "image files (PNG, JPEG, …; up to 40 megapixels), RGB or grayscale", metavar="IMAGE")
    top: int = flag(3, "how many classes to list per image")
    json: bool = flag(False, "print one JSON object per image instead of text (a file that fails: its error)")
    save_inputs: str | None = flag(
        None, "also write the 28×28 image the model saw for each file into this folder, as <file name>.28x28.png",
        metavar="DIR",
    )
    explain: bool = flag(False, "also show the 28×28 frame the model saw: as text art, or with --json its pixel values")

    def __post_init__(self) -> None:  # before predict imports torch
        if not self.model:
            raise UsageError("pass --model RUN_DIR, the output dir of a training run (or one of its checkpoints)")
        if not self.images:
            raise UsageError("pass at least one image file to classify")
        require_at_least(self, {"top": 1})


@dataclass
class DownloadConfig:
    dataset: str = flag("mnist", "which MNIST-format data set", choices=DATASET_NAMES)
    data_dir: str | None = flag(None, f"where to put it (default: ${DATA_DIR_ENV}, else ./data)")

    def resolved_data_dir(self) -> Path:
        return resolve_data_dir(self.data_dir)


@dataclass
class LaunchConfigFlags:
    name: str = flag("", "cpu-ddp, single-gpu, multi-gpu, multi-node, slurm-single-node or slurm-multi-node",
                     positional=True)
    copy: str = flag("", "write an editable copy of it into this folder (never over a file there) and print its path",
                     metavar="DIR")


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, argv, prog="python -m lenet_dist.train",
                        description="Train LeNet-5 on MNIST through accelerate.")
