"""LeNet-5 as the original README describes it: tanh activations and average pooling."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.profiler import record_function


class LeNet5(nn.Module):
    """conv(1→6, 5×5, pad 2) → tanh → avgpool → conv(6→16, 5×5) → tanh → avgpool → 400→120→84→10.

    The three stages are named so that profiler traces show `conv1`, `conv2` and `classifier`.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Sequential(nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Tanh(), nn.AvgPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, kernel_size=5), nn.Tanh(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.Tanh(),
            nn.Linear(120, 84),
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with _named("conv1"):
            features = self.conv1(images)
        with _named("conv2"):
            features = self.conv2(features)
        with _named("classifier"):
            return self.classifier(features)


def _named(name: str) -> contextlib.AbstractContextManager:
    """A profiler range, but not in a graph dynamo compiles: it drops them anyway, with a warning per range."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else record_function(name)


def unwrapped(model: nn.Module) -> LeNet5:
    """The LeNet-5 inside DDP's and torch.compile's wrappers (either order). accelerate's unwrap_model does the
    same, but it asks torch whether the model is compiled by importing torch's compiler and FSDP: 1.5 s of an
    eager run's start on a 2-core EPYC (py-spy)."""
    while not isinstance(model, LeNet5):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model
