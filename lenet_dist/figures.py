"""Run figures, drawn headless to PNG; placed by hand, few ticks, text keys: layout, ticks and legends cost most."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from lenet_dist.files import write_atomically

PREDICTION_SAMPLES = 32
MISTAKE_SAMPLES = 24
TILE, BORDER = 28, 2
FRAMED = TILE + 2 * BORDER
CELL_WIDTH, CAPTION_HEIGHT = 44, 14  # in image pixels: room for a caption above each framed tile
CELL_HEIGHT = CAPTION_HEIGHT + FRAMED + 2
RED, WHITE = (0.85, 0.1, 0.1), (1.0, 1.0, 1.0)
PANEL_HEIGHTS = {"loss": 2.6, "learning rate": 1.2, "accuracy": 2.6}  # inches
TOP_MARGIN, BOTTOM_MARGIN, PANEL_GAP = 0.75, 0.55, 0.15  # inches: the title and epoch names; the x-axis's labels
LOSS_SMOOTHING_SHARE = 50  # the smoothing spans 1/50 of the logged steps: 0.4 epoch in a 20-epoch run
LOG_SCALE_RANGE = 10  # a loss that falls by more than this factor is drawn on a log scale
ACCURACY_SPAN = 10.0  # percentage points shown below the best accuracy (or the target)
MAX_EPOCH_LABELS = 10  # beyond, every 2nd (3rd...) epoch is named, so that the names never overlap


def show_png(path: Path) -> None:
    import matplotlib.pyplot as plt

    backend = plt.get_backend()
    if backend.lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):  # matplotlib's non-interactive ones
        print(f"--show: no display to open a window on (matplotlib's backend is {backend}); the figure is {path}",
              flush=True)
        return
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
    row, column = divmod(index, columns)
    return row * CELL_HEIGHT + CAPTION_HEIGHT, column * CELL_WIDTH + (CELL_WIDTH - FRAMED) // 2


def save_image_grid(
    images: torch.Tensor, captions: list[str], wrong: list[bool], title: str, path: Path, *, columns: int = 8
) -> Path:
    """Captioned 28×28 images, the wrong ones in red: one mosaic in one `imshow`, as a subplot each took seconds."""
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


def smoothing_window(points: int) -> int:
    window = max(3, points // LOSS_SMOOTHING_SHARE) | 1
    return max(1, min(window, points if points % 2 else points - 1))


def smooth_loss(loss: np.ndarray, window: int) -> np.ndarray:
    """Per point, the line fitted to log(loss) over its centred window, NaN/inf left out: a mean lags at the ends."""
    count = len(loss)
    index = np.arange(count)
    low, high = np.maximum(index - window // 2, 0), np.minimum(index + window // 2 + 1, count)
    centred = index - (count - 1) / 2  # smaller squares to sum: less rounding
    with np.errstate(divide="ignore", invalid="ignore"):  # log of 0 or of NaN
        log_loss = np.log(loss)
    finite = np.isfinite(log_loss)
    x, y = np.where(finite, centred, 0.0), np.where(finite, log_loss, 0.0)

    def window_sums(series: np.ndarray) -> np.ndarray:
        running = np.concatenate(([0.0], np.cumsum(series)))
        return running[high] - running[low]

    points, sum_x, sum_y = window_sums(finite.astype(float)), window_sums(x), window_sums(y)
    with np.errstate(divide="ignore", invalid="ignore"):  # a window without a finite loss: NaN, a gap in the line
        mean_x, mean_y = sum_x / points, sum_y / points
        spread = window_sums(x * x) - sum_x * mean_x
        slope = np.where(points > 1, (window_sums(x * y) - sum_x * mean_y) / spread, 0.0)
    return np.exp(mean_y + slope * (centred - mean_x))


def training_curves_figure(metrics: dict[str, Any]) -> Figure:
    """Loss per logged step, learning rate and test accuracy against images seen; without `train_log`, epoch means."""
    train_log, evaluations = metrics.get("train_log") or [], metrics["evaluations"]
    images_per_epoch = metrics["steps_per_epoch"] * metrics["config"]["batch_size"]
    if train_log:
        panels = ["loss", "learning rate", "accuracy"]
    elif metrics["epochs"]:
        panels = ["loss", "accuracy"]
    else:  # stopped in its first epoch
        panels = ["accuracy"]
    heights = [PANEL_HEIGHTS[panel] for panel in panels]
    total = TOP_MARGIN + BOTTOM_MARGIN + sum(heights) + PANEL_GAP * (len(heights) - 1)
    figure = Figure(figsize=(9, total))
    figure.subplots_adjust(left=0.09, right=0.96, bottom=BOTTOM_MARGIN / total, top=1 - TOP_MARGIN / total,
                           hspace=PANEL_GAP / (sum(heights) / len(heights)))
    axes = list(figure.subplots(len(heights), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0])
    if train_log:
        _draw_loss(axes[0], train_log)
        _draw_learning_rate(axes[1], train_log)
    elif "loss" in panels:
        _draw_epoch_losses(axes[0], metrics["epochs"], images_per_epoch)
    _draw_accuracy(axes[-1], evaluations, metrics["config"].get("target_accuracy"), metrics.get("reached_target"))
    last_epoch = max((entry["epoch"] for entry in (*train_log, *evaluations)), default=1)
    _mark_epochs(axes, images_per_epoch, last_epoch)
    axes[0].set_xlim(0, 1.02 * max((entry["images"] for entry in (*train_log, *evaluations)), default=1))
    axes[-1].set_xlabel("images seen (all processes)")
    axes[-1].xaxis.set_major_formatter(FuncFormatter(lambda images, _: f"{images:,.0f}"))
    axes[-1].xaxis.set_major_locator(_few_ticks(6))  # shared by every panel, as the formatter
    last_step = max((entry["step"] for entry in (*train_log, *evaluations)), default=0)
    figure.suptitle(f"{last_step:,} steps of {metrics['config']['batch_size']:,} images, "
                    f"epoch {last_epoch} of {metrics['config']['epochs']}", fontsize=11)
    return figure


def save_training_curves(metrics: dict[str, Any], path: Path) -> Path:
    figure = training_curves_figure(metrics)
    write_atomically(path, lambda partial: figure.savefig(partial, dpi=90, format="png"))
    return path


def _few_ticks(count: int) -> MaxNLocator:
    return MaxNLocator(count, steps=[1, 2, 2.5, 5, 10])


def _draw_loss(axis: Axes, train_log: list[dict[str, Any]]) -> None:
    images = np.array([entry["images"] for entry in train_log], dtype=float)
    loss = np.array([entry["loss"] for entry in train_log], dtype=float)
    window = smoothing_window(len(loss))
    smoothed = smooth_loss(loss, window)
    axis.plot(images, loss, color="tab:blue", alpha=0.3, linewidth=0.7, label="logged steps")
    key = f"faint: the {len(loss):,} logged steps"
    if window > 1:
        axis.plot(images, smoothed, color="tab:blue", linewidth=1.6, label="smoothed")
        key += f"; bold: smoothed over {window}"
    shown = smoothed[np.isfinite(smoothed) & (smoothed > 0)]
    if len(shown) and shown.max() > LOG_SCALE_RANGE * shown.min():
        axis.set_yscale("log")
        axis.yaxis.set_minor_locator(NullLocator())  # eight a decade: they cost more to draw than the curves
        axis.yaxis.set_major_formatter(FuncFormatter(lambda loss, _: f"{loss:g}"))  # 10⁻² would be typeset: slow
    else:
        axis.yaxis.set_major_locator(_few_ticks(5))
    axis.set_ylabel("training loss")
    _key(axis, key)


def _draw_epoch_losses(axis: Axes, epochs: list[dict[str, Any]], images_per_epoch: int) -> None:
    axis.plot([record["epoch"] * images_per_epoch for record in epochs], [record["train_loss"] for record in epochs],
              marker="o", label="mean over the epoch")
    axis.set_ylabel("training loss")
    _key(axis, "the mean over each epoch (this run logged no steps)")


def _key(axis: Axes, text: str) -> None:
    axis.text(0.99, 0.97, text, transform=axis.transAxes, ha="right", va="top", fontsize=8, color="0.3")


def _draw_learning_rate(axis: Axes, train_log: list[dict[str, Any]]) -> None:
    """--lr's (Adam's), and --muon-lr's beside it in a Muon run: each group's own rate."""
    images = [entry["images"] for entry in train_log]
    axis.plot(images, [entry["lr"] for entry in train_log], color="tab:orange", label="--lr (Adam)")
    if train_log and "muon_lr" in train_log[0]:
        axis.plot(images, [entry["muon_lr"] for entry in train_log], color="tab:purple", label="--muon-lr (Muon)")
        axis.legend(loc="upper right", fontsize=8)
    axis.set_ylim(bottom=0)
    axis.yaxis.set_major_locator(_few_ticks(3))
    axis.set_ylabel("learning rate")


def _draw_accuracy(
    axis: Axes, evaluations: list[dict[str, Any]], target: float | None, reached: dict[str, Any] | None
) -> None:
    percent = [100 * evaluation["test_accuracy"] for evaluation in evaluations]
    axis.plot([evaluation["images"] for evaluation in evaluations], percent, marker="o", markersize=3.5,
              color="tab:green", label="test accuracy")
    axis.set_ylabel("test accuracy (%)")
    axis.yaxis.set_major_locator(_few_ticks(6))
    if target is not None:
        axis.axhline(100 * target, linestyle="--", linewidth=1, color="0.4", label="target")
        axis.text(0.005, 100 * target, f"target {100 * target:.2f} %", transform=axis.get_yaxis_transform(),
                  ha="left", va="top", fontsize=8, color="0.3")
    # a missed target is recorded as None or as {"reached": false, ...}: only an accuracy at the target counts
    if target is not None and reached and reached.get("test_accuracy", -1.0) >= target:
        x, y = reached["images"], 100 * reached["test_accuracy"]
        axis.plot([x], [y], marker="*", markersize=13, color="tab:red", linestyle="none", label="target reached")
        # up and to the left, where every earlier evaluation is below the target; near the y-axis, down and right
        leftward = x > 0.35 * max(evaluation["images"] for evaluation in evaluations)
        axis.annotate(f"{y:.2f} % at {x:,} images", (x, y), xytext=(-8, 8) if leftward else (8, -8),
                      textcoords="offset points", ha="right" if leftward else "left",
                      va="bottom" if leftward else "top", fontsize=9,
                      bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    if percent:
        best = max(*percent, 100 * target if target is not None else 0.0)
        # at most ACCURACY_SPAN below the best, the target in sight: the first evaluations may leave through the bottom
        low = min(max(min(percent), best - ACCURACY_SPAN), 100 * target if target is not None else 100.0)
        margin = max(0.1 * (best - low), 0.1)
        axis.set_ylim(low - margin, min(best + 3 * margin, 100 + margin))


def _mark_epochs(axes: list[Axes], images_per_epoch: int, last_epoch: int) -> None:
    starts = [(epoch, (epoch - 1) * images_per_epoch) for epoch in range(2, last_epoch + 1)]
    if not starts:
        return
    for axis in axes:
        # x in data, y in the axes' 0..1; kept out of autoscaling, where 0..1 would be read as losses
        lines = LineCollection([[(x, 0), (x, 1)] for _, x in starts], transform=axis.get_xaxis_transform(),
                               colors="0.75", linewidths=0.6, zorder=0)
        axis.add_collection(lines, autolim=False)
    every = -(-len(starts) // MAX_EPOCH_LABELS)
    for epoch, x in starts:
        if epoch % every == 0:
            axes[0].text(x, 1.01, f"epoch {epoch}", transform=axes[0].get_xaxis_transform(), ha="center",
                         va="bottom", fontsize=7, color="0.4")


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
