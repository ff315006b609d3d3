"""The learning-rate schedule: one-cycle over the run (or over its first --anneal-images), or constant."""

from __future__ import annotations

import math

import torch

from lenet_dist.config import TrainConfig

# Where the one-cycle schedule starts, as OneCycleLR has it: at a 25th of its peak.
ONE_CYCLE_START = 1 / 25


def build_lr_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle over the run (or its first --anneal-images, then holding), or constant. Adam's betas stay
    fixed: a graph cannot follow a per-step beta1, and fixed ends as high (BENCHMARKS.md, "Why two recipes")."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    steps = config.epochs * steps_per_epoch
    if config.anneal_images:
        steps = min(steps, max(2, config.anneal_images // config.batch_size))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, one_cycle(steps, config.warmup, config.final_lr_factor))


def one_cycle(steps: int, warmup: float, final: float):
    """OneCycleLR's learning rate (cosine up from ONE_CYCLE_START to 1, then down to `final`, as a factor of the
    peak) over `steps` steps, then its last value for good: a LambdaLR, unlike OneCycleLR, may go on."""
    peak_step = warmup * steps - 1

    def factor(step: int) -> float:
        step = min(step, steps - 1)
        if step <= peak_step:  # peak_step 0: a warm-up of one step starts at the peak
            start, end, done = ONE_CYCLE_START, 1.0, step / peak_step if peak_step > 0 else 1.0
        else:
            start, end, done = 1.0, final, (step - peak_step) / (steps - 1 - peak_step)
        return end + (start - end) / 2 * (math.cos(math.pi * done) + 1)

    return factor
