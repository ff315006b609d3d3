"""The timing core: training and inference images/s of one matrix cell, in this process.

Each cell trains the real LeNet-5 on real MNIST batches; images/s is the median of timed windows after a
warm-up that includes compilation. MFU is achieved FLOP/s (torch's flop counter × images/s) over the dense
matmul FLOP/s measured on this device in the same precision.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lenet_dist.config import TrainConfig
from lenet_dist.data import InMemoryDataset, Split, make_loader, torchvision_dataset
from lenet_dist.model import LeNet5
from lenet_dist.recipe.build import build_model, build_optimizer, build_training_batches

# The original script's loader: batch 64, no worker processes, the model and Adam as PyTorch makes them.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ORIGINAL_BATCH, ORIGINAL_WORKERS = 64, 0


@dataclass(frozen=True)
class Cell:
    """One row of the matrix: what is measured. `bench compare` matches rows by these five."""

    device: str
    pipeline: str  # "original" or "tuned" (see BenchConfig.pipelines)
    precision: str  # "no", "bf16", "fp16"
    compile: str  # "eager" or "compile"
    batch_size: int

    def label(self) -> str:
        return f"{self.device} {self.pipeline} {self.precision} {self.compile} b{self.batch_size}"


@dataclass
class Throughput:
    train_images_per_second: float
    inference_images_per_second: float
    train_windows: tuple[float, ...] = ()  # the training rate of each timed window, whose median it is


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PEAK_SIZE = {"cuda": 4096, "cpu": 2048}  # the square matmul the peak is measured with


def peak_precision(device: torch.device, precision: str) -> str:
    """What the fp32 rows' arithmetic is: on CUDA, PyTorch runs fp32 convolutions as TF32 by default, so their
    peak is TF32's too (an IEEE fp32 peak would flatter them eightfold)."""
    if precision != "no":
        return precision
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.conv.fp32_precision == "tf32" else "fp32"


def matmul_flops_per_second(device: torch.device, precision: str) -> float:
    """The device's dense matmul rate in this precision (TF32 for CUDA's fp32, see peak_precision): what the MFU
    divides by."""
    size = PEAK_SIZE[device.type]
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    rates = []
    with _matmul_precision("tf32" if peak_precision(device, precision) == "tf32" else None):
        for _ in range(7):
            synchronize(device)
            started = time.perf_counter()
            for _ in range(4):
                a @ b
            synchronize(device)
            rates.append(4 * 2 * size**3 / (time.perf_counter() - started))
    return max(rates)


@contextlib.contextmanager
def _matmul_precision(setting: str | None) -> Iterator[None]:
    before = torch.backends.cuda.matmul.fp32_precision
    if setting:
        torch.backends.cuda.matmul.fp32_precision = setting
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def flops_per_image() -> tuple[float, float]:
    """Training (forward + backward) and inference FLOPs of one image, by torch's own flop counter."""
    model, batch_size = LeNet5(), 64
    images, labels = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    training = counter.get_total_flops() / batch_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return training, counter.get_total_flops() / batch_size


def endless(batches: Callable[[int], Iterator]) -> Iterator:
    epoch = 0
    while True:
        yield from batches(epoch)
        epoch += 1


def training_batches(cell: Cell, train: Split, data_dir: Path) -> Iterator:
    device = torch.device(cell.device)
    if cell.pipeline == "tuned":  # what `lenet-dist train --batch-size N` trains on
        shuffled = build_training_batches(replace(TrainConfig(), batch_size=cell.batch_size), train, data_dir, device,
                                          rank=0, world_size=1)
        return endless(shuffled.epoch)
    loader = make_loader(torchvision_dataset(data_dir, train.info.name, train=True), cell.batch_size, shuffle=True,
                         workers=ORIGINAL_WORKERS, pin_memory=device.type == "cuda", drop_last=True)
    return endless(lambda _: iter(loader))


def test_batches(cell: Cell, test: Split, data_dir: Path) -> Iterator:
    """Whole batches only, so a compiled model sees one shape."""
    device = torch.device(cell.device)
    dataset = InMemoryDataset(test, device) if cell.pipeline == "tuned" else torchvision_dataset(
        data_dir, test.info.name, train=False)
    loader = make_loader(dataset, cell.batch_size, shuffle=False, workers=0, drop_last=True)
    return endless(lambda _: iter(loader))


def timed_windows(step: Callable[[], None], device: torch.device, steps_per_window: int, windows: int,
                  batch_size: int) -> list[float]:
    """Images/s of each of `windows` windows; `step()` runs one batch."""
    rates = []
    for _ in range(windows):
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps_per_window):
            step()
        synchronize(device)
        rates.append(steps_per_window * batch_size / (time.perf_counter() - started))
    return rates


def model_and_optimizer(cell: Cell) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The tuned rows build exactly what `lenet-dist train` builds; the original rows what the original script did."""
    torch.manual_seed(0)
    if cell.pipeline == "tuned":
        config = TrainConfig()
        model = build_model(config, num_classes=10)
        return model, build_optimizer(config, model)
    model = LeNet5()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def measure(cell: Cell, train: Split, test: Split, data_dir: Path, window_images: int, windows: int,
            profiler: Any) -> Throughput:
    device = torch.device(cell.device)
    model, optimizer = model_and_optimizer(cell)
    model.to(device)  # in place: the optimizer keeps the same parameters
    scaler = torch.amp.GradScaler(device.type, enabled=cell.precision == "fp16")
    if cell.compile == "compile":
        # a fresh compile per cell: a shared cache hits dynamo's recompile limit, and later cells run eager
        torch.compiler.reset()
    network = torch.compile(model, dynamic=False) if cell.compile == "compile" else model
    steps_per_window = max(4, window_images // cell.batch_size)
    batches = training_batches(cell, train, data_dir)

    def train_step() -> None:
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, cell.precision):
            loss = F.cross_entropy(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        profiler.step()

    network.train()
    for _ in range(max(3, steps_per_window // 2)):  # warm-up: worker start, allocator, compilation
        train_step()
    train_rates = timed_windows(train_step, device, steps_per_window, windows, cell.batch_size)

    evaluation = test_batches(cell, test, data_dir)

    @torch.no_grad()
    def inference_step() -> None:
        images, _ = next(evaluation)
        with autocast(device, cell.precision):
            network(images.to(device, non_blocking=True)).argmax(dim=1)

    network.eval()
    for _ in range(3):
        inference_step()
    inference_rates = timed_windows(inference_step, device, steps_per_window, windows, cell.batch_size)
    return Throughput(statistics.median(train_rates), statistics.median(inference_rates), tuple(train_rates))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision outside accelerate (this benchmark's loop); train gets the same from accelerate."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
