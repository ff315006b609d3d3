"""`lenet-dist predict --model RUN_DIR IMAGE...`: classify your own images with a trained run.

Photos and scans are brought to MNIST's conventions first: grayscale, a light digit on a dark
background (a dark digit on light paper is inverted), the digit's bounding box scaled to fit 20×20
and placed in a 28×28 frame by its centre of mass, as LeCun et al. prepared MNIST.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lenet_dist.checkpoint import load_model
from lenet_dist.config import PredictConfig
from lenet_dist.data import DATASETS, normalize
from lenet_dist.errors import UsageError, UserError

DIGIT_BOX, FRAME = 20, 28
INK_THRESHOLD = 0.2  # of the image's brightness range: fainter pixels are background


def to_mnist_frame(path: Path) -> torch.Tensor:
    """An image file as a uint8 28×28 tensor in MNIST's conventions."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable image ({type(error).__name__}); pass a PNG or JPEG file") from None
    if np.median(gray) > 0.5:  # light background: MNIST has white ink on black
        gray = 1 - gray
    low, high = gray.min(), gray.max()
    if high - low < 1e-6:
        raise UserError(f"{path}: the image is blank (one flat colour); nothing to classify")
    gray = (gray - low) / (high - low)
    rows, cols = np.nonzero(gray > INK_THRESHOLD)
    digit = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = DIGIT_BOX / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    resized = np.asarray(
        Image.fromarray((digit * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS), dtype=np.float32
    )
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    top, left = (FRAME - resized.shape[0]) // 2, (FRAME - resized.shape[1]) // 2
    frame[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    frame = _centre_of_mass_shift(frame)
    return torch.from_numpy(frame.clip(0, 255).round().astype(np.uint8))


def _centre_of_mass_shift(frame: np.ndarray) -> np.ndarray:
    total = frame.sum()
    rows, cols = np.indices(frame.shape)
    shift_rows = round(FRAME / 2 - 0.5 - (rows * frame).sum() / total)
    shift_cols = round(FRAME / 2 - 0.5 - (cols * frame).sum() / total)
    return np.roll(frame, (shift_rows, shift_cols), axis=(0, 1))


@torch.no_grad()
def classify(model: torch.nn.Module, frame: torch.Tensor, dataset: str, top: int) -> list[tuple[str, float]]:
    info = DATASETS[dataset]
    probabilities = model(normalize(frame.unsqueeze(0), info)).softmax(dim=1)[0]
    values, classes = probabilities.topk(top)
    return [(info.classes[c], float(v)) for c, v in zip(classes.tolist(), values.tolist())]


def run(config: PredictConfig) -> int:
    """Classify every file; report unreadable ones and carry on. Returns the exit status."""
    if not config.model:
        raise UsageError("pass --model RUN_DIR, the output dir of a training run")
    if not config.images:
        raise UsageError("pass at least one image file to classify")
    model, metadata = load_model(Path(config.model))
    dataset = metadata.get("config", {}).get("dataset", "mnist")
    failures = 0
    for name in config.images:
        try:
            ranked = classify(model, to_mnist_frame(Path(name)), dataset, min(config.top, model.num_classes))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
            continue
        if config.json:
            print(json.dumps({"file": name, "prediction": ranked[0][0],
                              "top": [{"class": c, "probability": p} for c, p in ranked]}))
        else:
            print(f"{name}: {ranked[0][0]}   top-{len(ranked)}: " + ", ".join(f"{c} {p:.1%}" for c, p in ranked))
    return 1 if failures else 0
