"""Figures rendered headless to PNG (a bare `Figure` needs no GUI backend); `show` opens a window."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from lenet_dist.files import write_atomically

PREDICTION_SAMPLES = 32
MISTAKE_SAMPLES = 24
TILE, BORDER = 28, 2
FRAMED = TILE + 2 * BORDER
CELL_WIDTH, CAPTION_HEIGHT = 44, 14  # in image pixels: room for a caption above each framed tile
CELL_HEIGHT = CAPTION_HEIGHT + FRAMED + 2
RED, WHITE = (0.85, 0.1, 0.1), (1.0, 1.0, 1.0)


def show_png(path: Path) -> None:
    """Open a saved figure in a window, as the original script's plt.show() did."""
    import matplotlib.pyplot as plt

    plt.imshow(plt.imread(path))
    plt.axis("off")
    plt.show()


def image_mosaic(images: np.ndarray, wrong: list[bool], columns: int) -> np.ndarray:
    """28×28 grayscale images tiled into one RGB array, each framed (red when wrong) below a caption band."""
    rows = max(1, -(-len(images) // columns))
    mosaic = np.ones((rows * CELL_HEIGHT, columns * CELL_WIDTH, 3), dtype=np.float32)
    for index, (image, is_wrong) in enumerate(zip(images, wrong, strict=True)):
        top, left = _tile_origin(index, columns)
        mosaic[top : top + FRAMED, left : left + FRAMED] = RED if is_wrong else WHITE
        scaled = (image.astype(np.float32) - image.min()) / max(float(np.ptp(image)), 1e-6)
        mosaic[top + BORDER : top + BORDER + TILE, left + BORDER : left + BORDER + TILE] = scaled[..., None]
    return mosaic


def _tile_origin(index: int, columns: int) -> tuple[int, int]:
    """Top-left pixel of the framed tile `index` in the mosaic."""
    row, column = divmod(index, columns)
    return row * CELL_HEIGHT + CAPTION_HEIGHT, column * CELL_WIDTH + (CELL_WIDTH - FRAMED) // 2


def save_image_grid(
    images: torch.Tensor, captions: list[str], wrong: list[bool], title: str, path: Path, *, columns: int = 8
) -> Path:
    """A grid of 28×28 images with a caption each, the wrong ones framed and captioned in red.

    One mosaic in one `imshow` with the captions as text: a subplot per image made the two grids of a
    run cost seconds to draw.
    """
    rows = max(1, -(-len(images) // columns))
    height = rows * 1.55 + 0.5
    figure = Figure(figsize=(columns * 1.4, height))
    axis = figure.add_axes((0.01, 0.01, 0.98, 1 - 0.6 / height))  # placed by hand: a layout engine costs more
    axis.imshow(image_mosaic(images.cpu().numpy(), wrong, columns), interpolation="nearest")
    for index, (caption, is_wrong) in enumerate(zip(captions, wrong, strict=True)):
        top, left = _tile_origin(index, columns)
        axis.text(left + FRAMED / 2, top - 1.5, caption, ha="center", va="bottom", fontsize=9,
                  color="red" if is_wrong else "black")
    axis.set_axis_off()
    figure.suptitle(title, y=1 - 0.12 / height, va="top")
    write_atomically(path, lambda partial: figure.savefig(partial, dpi=90, format="png"))
    return path


def save_predictions_grid(
    images: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str], path: Path
) -> Path:
    """The first test images captioned `pred P / true T`, mistakes in red, as the original script's figure."""
    pairs = list(zip(predicted.tolist(), truth.tolist(), strict=True))
    wrong = [p != t for p, t in pairs]
    return save_image_grid(
        images, [f"pred {classes[p]} / true {classes[t]}" for p, t in pairs], wrong,
        f"LeNet-5 on the first {len(pairs)} test images: {sum(wrong)} wrong (in red)", path,
    )


def save_confident_mistakes(
    images: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, confidence: torch.Tensor,
    classes: Sequence[str], path: Path,
) -> Path:
    """The test images the model got wrong with the highest confidence: where to look for label noise."""
    wrong = (predicted != truth).nonzero().squeeze(1)
    worst = wrong[confidence[wrong].argsort(descending=True)][:MISTAKE_SAMPLES]
    titles = [f"{classes[predicted[i]]} ({confidence[i]:.0%}) / {classes[truth[i]]}" for i in worst.tolist()]
    return save_image_grid(
        images[worst], titles, [True] * len(worst),
        f"Most confidently wrong: predicted (confidence) / true — {len(wrong)} mistakes of {len(truth):,}", path,
    )


def save_confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str], path: Path) -> Path:
    count = len(classes)
    matrix = torch.bincount(truth * count + predicted, minlength=count * count).reshape(count, count)
    figure = Figure(figsize=(7, 6))
    figure.subplots_adjust(left=0.14, right=0.98, bottom=0.14, top=0.93)
    axis = figure.subplots()
    # log scale: the diagonal holds ~1,000 per class, the mistakes a handful; linear would hide them
    shown = axis.imshow(torch.log10(matrix.float() + 1), cmap="Blues")
    for true in range(count):
        for pred in range(count):
            value = int(matrix[true, pred])
            if value:
                axis.text(pred, true, str(value), ha="center", va="center", fontsize=7,
                          color="white" if true == pred else "black")
    axis.set_xticks(range(count), classes, rotation=45, fontsize=8)
    axis.set_yticks(range(count), classes, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"Confusion matrix, {len(truth):,} test images")
    figure.colorbar(shown, label="log10(count + 1)")
    write_atomically(path, lambda partial: figure.savefig(partial, dpi=90, format="png"))
    return path


def save_training_curves(metrics: dict[str, Any], path: Path) -> Path:
    """Mean training loss per epoch, and the test accuracy at every evaluation (mid-epoch ones included)."""
    figure = Figure(figsize=(9, 3.5))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.25)
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    epochs = metrics["epochs"]
    numbers = [e["epoch"] for e in epochs]
    loss_axis.plot(numbers, [e["train_loss"] for e in epochs], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="mean training loss", title="Training loss", xticks=numbers)
    evaluations = metrics["evaluations"]
    images_per_epoch = metrics["steps_per_epoch"] * metrics["config"]["batch_size"]
    accuracy_axis.plot([e["images"] / images_per_epoch for e in evaluations],
                       [100 * e["test_accuracy"] for e in evaluations], marker="o", color="tab:green")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    write_atomically(path, lambda partial: figure.savefig(partial, dpi=90, format="png"))
    return path


def save_run_figures(
    run_dir: Path, metrics: dict[str, Any], predictions: dict[str, torch.Tensor], test_images: torch.Tensor,
    classes: Sequence[str],
) -> list[Path]:
    """Every figure of a finished run; `predictions` holds the whole test set's, in order."""
    predicted, truth, confidence = predictions["predicted"], predictions["truth"], predictions["confidence"]
    first = slice(0, PREDICTION_SAMPLES)
    return [
        save_predictions_grid(test_images[first], predicted[first], truth[first], classes, run_dir / "predictions.png"),
        save_training_curves(metrics, run_dir / "training_curves.png"),
        save_confusion_matrix(predicted, truth, classes, run_dir / "confusion_matrix.png"),
        save_confident_mistakes(test_images, predicted, truth, confidence, classes, run_dir / "confident_mistakes.png"),
    ]
