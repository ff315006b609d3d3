"""training_curves.png from synthetic metrics, in metrics.json's shape: what a short --target-accuracy run,
a 20-epoch run and a run recorded before `train_log` existed each draw, and what drawing one costs."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from lenet_dist.figures import save_training_curves, smooth_loss, smoothing_window, training_curves_figure

STEPS_PER_EPOCH, BATCH_SIZE, LOG_EVERY = 468, 128, 10
# a --target-accuracy 0.98 run: evaluations closing in on the target, the last one meeting it
SHORT_RUN_ACCURACY = {117: 0.9412, 234: 0.9655, 290: 0.9731, 330: 0.9790, 368: 0.9801}


def epoch_of(step: int) -> int:
    return (step - 1) // STEPS_PER_EPOCH + 1


def synthetic_metrics(
    last_step: int, accuracy_at: dict[int, float], *, epochs: int, target: float | None = None,
    log_every: int = LOG_EVERY,
) -> dict[str, Any]:
    """metrics.json of a run that stopped at `last_step`: a loss falling by two orders of magnitude with
    per-step noise, a one-cycle learning rate, logged every `log_every` steps and at each epoch's end."""
    noise = np.random.default_rng(0)
    total_steps = epochs * STEPS_PER_EPOCH
    logged = sorted({*range(log_every, last_step + 1, log_every), *range(STEPS_PER_EPOCH, last_step + 1,
                                                                         STEPS_PER_EPOCH)})
    train_log = [
        {"step": step, "epoch": epoch_of(step), "images": step * BATCH_SIZE,
         "loss": (2.3 * math.exp(-step / 60) + 0.04 * math.exp(-3 * step / total_steps)) * noise.lognormal(0, 0.4),
         "lr": 0.006 * (step / (0.3 * total_steps) if step < 0.3 * total_steps
                        else (1 + math.cos(math.pi * (step - 0.3 * total_steps) / (0.7 * total_steps))) / 2)}
        for step in logged
    ]
    evaluations = [
        {"step": step, "epoch": epoch_of(step), "images": step * BATCH_SIZE, "test_accuracy": accuracy,
         "eval_samples": 10_000, "elapsed_seconds": step * 0.01}
        for step, accuracy in accuracy_at.items()
    ]
    reached = [e for e in evaluations if target is not None and e["test_accuracy"] >= target]
    return {
        "config": {"batch_size": BATCH_SIZE, "epochs": epochs, "target_accuracy": target},
        "steps_per_epoch": STEPS_PER_EPOCH,
        "train_log": train_log,
        "evaluations": evaluations,
        "reached_target": reached[0] if reached else None,
        "epochs": [{"epoch": e["epoch"], "train_loss": 0.5 / e["epoch"], "test_accuracy": e["test_accuracy"]}
                   for e in evaluations if e["step"] % STEPS_PER_EPOCH == 0],
    }


def short_target_run() -> dict[str, Any]:
    return synthetic_metrics(368, SHORT_RUN_ACCURACY, epochs=2, target=0.98)


def long_run(target: float | None = None, log_every: int = LOG_EVERY) -> dict[str, Any]:
    """20 epochs, evaluated at each epoch's end."""
    accuracy = {epoch * STEPS_PER_EPOCH: 0.992 - 0.03 * math.exp(-epoch / 2) for epoch in range(1, 21)}
    return synthetic_metrics(20 * STEPS_PER_EPOCH, accuracy, epochs=20, target=target, log_every=log_every)


def legacy_run() -> dict[str, Any]:
    """metrics.json as runs wrote it before `train_log`: three epochs' mean losses."""
    metrics = synthetic_metrics(3 * STEPS_PER_EPOCH, {e * STEPS_PER_EPOCH: 0.97 + e / 200 for e in (1, 2, 3)},
                                epochs=3)
    del metrics["train_log"]
    return metrics


def lines_by_label(axis: Axes) -> dict[str, Line2D]:
    return {line.get_label(): line for line in axis.get_lines()}


def epoch_names(figure: Figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].texts if text.get_text().startswith("epoch")]


@pytest.mark.parametrize("metrics", [short_target_run(), long_run(), legacy_run(),
                                     synthetic_metrics(50, {50: 0.9}, epochs=2)],
                         ids=["short-target-run", "20-epochs", "legacy", "stopped-in-epoch-1"])
def test_the_png_is_a_valid_image_of_the_figure(metrics, tmp_path):
    path = save_training_curves(metrics, tmp_path / "training_curves.png")
    with Image.open(path) as image:
        image.verify()
    width, height = training_curves_figure(metrics).get_size_inches() * 90
    with Image.open(path) as image:
        assert image.size == (round(width), round(height))
    assert [p.name for p in tmp_path.iterdir()] == ["training_curves.png"]  # written atomically: no .partial left


def test_every_panel_shares_one_axis_of_images_seen():
    metrics = short_target_run()
    figure = training_curves_figure(metrics)
    loss, rate, accuracy = figure.axes
    assert all(loss.get_shared_x_axes().joined(loss, other) for other in (rate, accuracy))
    assert "images" in accuracy.get_xlabel()
    logged_images = [entry["images"] for entry in metrics["train_log"]]
    assert list(loss.get_lines()[0].get_xdata()) == logged_images
    assert list(rate.get_lines()[0].get_xdata()) == logged_images
    assert list(rate.get_lines()[0].get_ydata()) == [entry["lr"] for entry in metrics["train_log"]]
    assert list(lines_by_label(accuracy)["test accuracy"].get_xdata()) == [s * BATCH_SIZE for s in SHORT_RUN_ACCURACY]
    assert accuracy.get_xlim() == (0, pytest.approx(1.02 * 368 * BATCH_SIZE))  # to the last evaluation



def test_a_muon_run_plots_both_learning_rates_each_named():
    """Under --optimizer muon, --lr steps Adam's group and --muon-lr Muon's: both drawn, neither passed off as the
    other."""
    metrics = short_target_run()
    for entry in metrics["train_log"]:
        entry["muon_lr"] = entry["lr"] * 2
    rate = training_curves_figure(metrics).axes[1]
    lines = lines_by_label(rate)
    assert list(lines["--lr (Adam)"].get_ydata()) == [entry["lr"] for entry in metrics["train_log"]]
    assert list(lines["--muon-lr (Muon)"].get_ydata()) == [entry["muon_lr"] for entry in metrics["train_log"]]
    assert [text.get_text() for text in rate.get_legend().get_texts()] == ["--lr (Adam)", "--muon-lr (Muon)"]
    assert "--muon-lr (Muon)" not in lines_by_label(training_curves_figure(short_target_run()).axes[1])

def test_the_target_is_a_dashed_line_and_where_it_was_reached_is_marked_and_named():
    accuracy = training_curves_figure(short_target_run()).axes[-1]
    lines = lines_by_label(accuracy)
    target = lines["target"]
    assert list(target.get_ydata()) == [98.0, 98.0] and target.get_linestyle() == "--"
    reached = lines["target reached"]
    assert list(reached.get_xdata()) == [368 * BATCH_SIZE] and list(reached.get_ydata()) == [pytest.approx(98.01)]
    assert [text.get_text() for text in accuracy.texts] == ["target 98.00 %", "98.01 % at 47,104 images"]
    bottom, top = accuracy.get_ylim()
    assert bottom < 94.12 and 98.01 < top <= 100.5  # every evaluation in sight, headroom, nothing past 100 %


def test_the_reached_point_is_named_where_its_text_has_room():
    (late,) = [t for t in training_curves_figure(short_target_run()).axes[-1].texts if "images" in t.get_text()]
    assert late.get_ha() == "right"  # up and to the left, over the evaluations below the target
    (early,) = [t for t in training_curves_figure(long_run(target=0.97)).axes[-1].texts if "images" in t.get_text()]
    assert early.get_text() == "97.38 % at 59,904 images"  # reached at the first epoch's end
    assert early.get_ha() == "left"  # to the right: on the left it would run into the y-axis
    bottom, top = training_curves_figure(long_run(target=0.97)).axes[-1].get_ylim()
    assert bottom < 97.0 < 97.38 < top  # the target in sight though every evaluation is above it


@pytest.mark.parametrize("reached_target", [None, {"reached": False, "best_accuracy": 0.97}])
def test_a_missed_target_is_drawn_but_nothing_is_marked_as_reached(reached_target):
    metrics = short_target_run() | {"reached_target": reached_target}
    metrics["config"]["target_accuracy"] = 0.99
    accuracy = training_curves_figure(metrics).axes[-1]
    assert set(lines_by_label(accuracy)) == {"test accuracy", "target"}
    assert [text.get_text() for text in accuracy.texts] == ["target 99.00 %"]  # and no "reached at"


def test_without_a_target_there_is_no_target_line():
    accuracy = training_curves_figure(long_run()).axes[-1]
    assert set(lines_by_label(accuracy)) == {"test accuracy"} and not accuracy.texts


def test_the_loss_is_drawn_at_every_logged_step_with_a_smoothed_line_on_a_log_scale():
    metrics = long_run()
    train_log = metrics["train_log"]
    assert len(train_log) == 936 + 16  # every 10th of 9,360 steps, and the 16 epoch ends not among them
    loss_axis = training_curves_figure(metrics).axes[0]
    raw, smoothed = loss_axis.get_lines()
    assert (raw.get_label(), smoothed.get_label()) == ("logged steps", "smoothed")
    assert "faint: the 952 logged steps; bold: smoothed over 19" in [text.get_text() for text in loss_axis.texts]
    assert list(raw.get_xdata()) == [entry["images"] for entry in train_log]
    assert list(raw.get_ydata()) == [entry["loss"] for entry in train_log]
    assert len(smoothed.get_xdata()) == len(train_log)
    assert loss_axis.get_yscale() == "log"
    # the smoothed line follows the trend with far less step-to-step noise than the raw one
    assert np.std(np.diff(np.log(smoothed.get_ydata()[100:]))) < np.std(np.diff(np.log(raw.get_ydata()[100:]))) / 5


def test_epoch_boundaries_are_lines_in_every_panel_and_named_sparsely_above():
    figure = training_curves_figure(long_run())
    starts = [(epoch - 1) * STEPS_PER_EPOCH * BATCH_SIZE for epoch in range(2, 21)]
    for axis in figure.axes:
        (boundaries,) = [c for c in axis.collections if isinstance(c, LineCollection)]
        assert [segment[0][0] for segment in boundaries.get_segments()] == starts
    assert epoch_names(figure) == [f"epoch {e}" for e in range(2, 21, 2)]
    assert epoch_names(training_curves_figure(legacy_run())) == ["epoch 2", "epoch 3"]
    assert epoch_names(training_curves_figure(short_target_run())) == []  # it stopped in its first epoch


def test_a_run_recorded_before_train_log_draws_its_epochs_mean_losses():
    metrics = legacy_run()
    loss, accuracy = training_curves_figure(metrics).axes
    means = lines_by_label(loss)["mean over the epoch"]
    assert list(means.get_xdata()) == [e * STEPS_PER_EPOCH * BATCH_SIZE for e in (1, 2, 3)]
    assert list(means.get_ydata()) == [record["train_loss"] for record in metrics["epochs"]]
    assert loss.get_shared_x_axes().joined(loss, accuracy)
    assert len(training_curves_figure(legacy_run() | {"epochs": []}).axes) == 1  # accuracy only


def test_the_smoothed_loss_follows_an_exponential_decay_to_both_ends():
    steps = np.arange(40.0)
    assert smooth_loss(np.exp(-steps / 7), 9) == pytest.approx(np.exp(-steps / 7))  # a straight line on a log axis
    # within the run, the window's geometric mean
    assert smooth_loss(np.array([1.0, 4.0, 1.0, 4.0, 1.0]), 3)[1:4] == pytest.approx([4 ** (1 / 3), 4 ** (2 / 3),
                                                                                   4 ** (1 / 3)])


def test_the_smoothed_loss_skips_what_is_not_a_loss():
    smoothed = smooth_loss(np.array([1.0, np.nan, 4.0, np.inf, 16.0, 0.0, -1.0]), 3)
    assert smoothed[:5] == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0])
    assert math.isnan(smoothed[6])  # nothing in its window: a gap in the line


def test_the_smoothed_loss_does_not_end_in_the_last_steps_noise():
    noise = np.random.default_rng(1)
    ends = np.array([smooth_loss(noise.lognormal(0, 0.5, 952), 19)[[0, -1]] for _ in range(300)])
    assert all(np.log(ends).std(axis=0) < 0.35)  # the raw loss: 0.5; a mean narrowing to the last point: as much


@pytest.mark.parametrize(("points", "window"), [(1, 1), (2, 1), (3, 3), (30, 3), (952, 19), (9_360, 187)])
def test_the_smoothing_window_is_odd_and_grows_with_the_points(points, window):
    assert smoothing_window(points) == window


def test_rendering_time_of_a_20_epoch_run(tmp_path, capsys):
    """Rendering is part of every run's fixed overhead: reported here, not asserted (machines are noisy),
    the best of three so that another process's burst does not count."""
    save_training_curves(short_target_run(), tmp_path / "warm-up.png")  # a run's earlier figures load the fonts
    timings = {}
    for name, metrics in (("short target run", short_target_run()), ("20 epochs", long_run()),
                          ("20 epochs, every step logged", long_run(log_every=1))):
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            save_training_curves(metrics, tmp_path / "training_curves.png")
            seconds.append(time.perf_counter() - start)
        timings[name] = f"{min(seconds):.3f} s ({len(metrics['train_log']):,} points logged)"
    with capsys.disabled():
        print(f"\ntraining_curves.png rendered in: {timings}")
