"""Figures rendered headless to PNG (a bare `Figure` needs no GUI backend); `show` opens a window."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure


def show_png(path: Path) -> None:
    """Open a saved figure in a window, as the seed's plt.show() did."""
    import matplotlib.pyplot as plt

    plt.imshow(plt.imread(path))
    plt.axis("off")
    plt.show()


def save_predictions_grid(
    images: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, path: Path, *, columns: int = 8
) -> Path:
    """A grid of test digits titled `pred P / true T`; mistakes are titled in red."""
    rows = -(-len(images) // columns)
    figure = Figure(figsize=(columns * 1.3, rows * 1.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    pairs = list(zip(predicted.tolist(), truth.tolist()))
    for axis, image, (pred, true) in zip(axes.flat, images.cpu(), pairs):
        axis.imshow(image.squeeze(), cmap="gray")
        axis.set_title(f"pred {pred} / true {true}", fontsize=8, color="red" if pred != true else "black")
    mistakes = sum(pred != true for pred, true in pairs)
    figure.suptitle(f"LeNet-5 on MNIST test images: {mistakes} of {len(pairs)} wrong (in red)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
