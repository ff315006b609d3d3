"""--augment: each training batch redrawn as other writers and pens would have drawn it, on the batch's device.

MNIST's writers wrote upright, with one pen, into a box; a model that saw only them misreads slanted, narrow or
thick-penned handwriting. Every image gets a small random affine change (rotation, independent x and y scale,
shear, a shift of a couple of pixels: one `grid_sample` for the whole batch) and, half of the time, its strokes
thickened or thinned by a fraction of a 3×3 max- or min-pool (dilation, erosion).

The draws are a function of (seed, epoch, step) alone, made for the whole global batch on the CPU: a resumed run
redraws exactly what the uninterrupted one drew, and each DDP rank takes its own rows, so 1 and N processes train
on the same images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ROTATION = math.radians(12)  # ± this, about the frame's centre
SCALE = (0.85, 1.15)  # the height
ASPECT = (0.6, 1.25)  # width / height against the writer's, log-uniform: narrow hands are where MNIST models fail
SHEAR = 0.3  # ± x shift per unit of height: a slanted hand
SHIFT = 2.0  # ± pixels in x and y: framing a little off centre
STROKE_CHANCE = 0.5  # the share of images whose pen is changed
THINNEST = 0.5  # at most half a min-pool: a whole one leaves MNIST's 2-3 pixel strokes a faint grey trace
SIZE = 28


def draws_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of one step's draws, from the run's seed, the 0-based epoch and the step within it alone."""
    state = np.random.SeedSequence([seed, epoch, step, 0xA06]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def random_distortions(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images' draws: their affine_matrices and each stroke change (count: -1 would erode fully, 1 dilates
    fully, 0 leaves the pen)."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(count, generator=generator, dtype=torch.float64) * (high - low) + low

    angle, shear = uniform(-ROTATION, ROTATION), uniform(-SHEAR, SHEAR)
    scale_y = uniform(*SCALE)
    scale_x = scale_y * torch.exp(uniform(*map(math.log, ASPECT)))
    shift = torch.stack((uniform(-SHIFT, SHIFT), uniform(-SHIFT, SHIFT)), 1)
    stroke = uniform(-THINNEST, 1) * (torch.rand(count, generator=generator, dtype=torch.float64) < STROKE_CHANCE)
    return affine_matrices(angle, shear, scale_x, scale_y, shift), stroke.float()


def affine_matrices(angle: torch.Tensor, shear: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor,
                    shift: torch.Tensor) -> torch.Tensor:
    """affine_grid's matrices (N × 2 × 3: where in the input, in its -1…1 coordinates, each output pixel comes
    from) of the maps that scale the digit about the frame's centre, then shear it (x += shear · y), rotate it by
    `angle` radians and shift it by `shift` (N × 2) pixels; x runs right and y down."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    forward = torch.stack((
        torch.stack((cos * scale_x, (cos * shear - sin) * scale_y), 1),
        torch.stack((sin * scale_x, (sin * shear + cos) * scale_y), 1),
    ), 1)
    inverse = torch.linalg.inv(forward)
    return torch.cat((inverse, -(inverse @ (shift * 2 / SIZE).unsqueeze(2))), 2).float()


def distort(images: torch.Tensor, matrices: torch.Tensor, stroke: torch.Tensor, background: float) -> torch.Tensor:
    """Apply the draws to a batch of N × 1 × 28 × 28 images whose paper is `background` (normalised data's
    value of a blank pixel): the paper brought in at the edges stays paper."""
    device = images.device
    ink = images - background
    grid = F.affine_grid(matrices.to(device), list(ink.shape), align_corners=False)
    ink = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    stroke = stroke.to(device).view(-1, 1, 1, 1)
    thicker, thinner = max_pool_3x3(ink), -max_pool_3x3(-ink)
    ink = ink + stroke.clamp(min=0) * (thicker - ink) + (-stroke).clamp(min=0) * (thinner - ink)
    return ink + background


def max_pool_3x3(images: torch.Tensor) -> torch.Tensor:
    """max_pool2d(images, 3, stride=1, padding=1), the same numbers as maxima of shifted views, a row's then a
    column's: on 28×28 images on the CPU, a tenth of max_pool2d's time."""
    padded = F.pad(images, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def augment(images: torch.Tensor, background: float, seed: int, epoch: int, step: int,
            rows: slice = slice(None), global_batch: int | None = None) -> torch.Tensor:
    """Step `step` of `epoch` (0-based) of a run seeded `seed`: its global batch's draws, of which `images` are
    the `rows` (a DDP rank's share; by default all of a `global_batch` the size of `images`)."""
    matrices, stroke = random_distortions(global_batch or len(images), draws_generator(seed, epoch, step))
    return distort(images, matrices[rows], stroke[rows], background)
