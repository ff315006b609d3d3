"""Figures rendered headless to PNG (a bare `Figure` needs no GUI backend); `show` opens a window."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from matplotlib.figure import Figure

PREDICTION_SAMPLES = 32
MISTAKE_SAMPLES = 24


def show_png(path: Path) -> None:
    """Open a saved figure in a window, as the seed's plt.show() did."""
    import matplotlib.pyplot as plt

    plt.imshow(plt.imread(path))
    plt.axis("off")
    plt.show()


def save_image_grid(
    images: torch.Tensor, titles: list[str], wrong: list[bool], title: str, path: Path, *, columns: int = 8
) -> Path:
    """A grid of 28×28 images with a title each; the wrong ones titled in red."""
    rows = max(1, -(-len(images) // columns))
    figure = Figure(figsize=(columns * 1.4, rows * 1.55 + 0.5), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption, is_wrong in zip(axes.flat, images.cpu(), titles, wrong):
        axis.imshow(image.squeeze(), cmap="gray")
        axis.set_title(caption, fontsize=8, color="red" if is_wrong else "black")
    figure.suptitle(title)
    figure.savefig(path, dpi=90)
    return path


def save_predictions_grid(
    images: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, classes: Sequence[str], path: Path
) -> Path:
    """The first test images titled `pred P / true T`, mistakes in red, as the seed's figure."""
    pairs = list(zip(predicted.tolist(), truth.tolist()))
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
    figure = Figure(figsize=(7, 6), layout="constrained")
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
    figure.savefig(path, dpi=90)
    return path


def save_training_curves(epochs: list[dict[str, Any]], path: Path) -> Path:
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    numbers = [e["epoch"] for e in epochs]
    loss_axis.plot(numbers, [e["train_loss"] for e in epochs], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="mean training loss", title="Training loss", xticks=numbers)
    accuracy_axis.plot(numbers, [100 * e["test_accuracy"] for e in epochs], marker="o", color="tab:green")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy", xticks=numbers)
    figure.savefig(path, dpi=90)
    return path


def save_run_figures(
    run_dir: Path, epochs: list[dict[str, Any]], results: dict[str, torch.Tensor], test_images: torch.Tensor,
    classes: Sequence[str],
) -> list[Path]:
    """Every figure of a finished run; `results` holds the whole test set's predictions, in order."""
    predicted, truth, confidence = results["predicted"], results["truth"], results["confidence"]
    first = slice(0, PREDICTION_SAMPLES)
    return [
        save_predictions_grid(test_images[first], predicted[first], truth[first], classes, run_dir / "predictions.png"),
        save_training_curves(epochs, run_dir / "training_curves.png"),
        save_confusion_matrix(predicted, truth, classes, run_dir / "confusion_matrix.png"),
        save_confident_mistakes(test_images, predicted, truth, confidence, classes, run_dir / "confident_mistakes.png"),
    ]
