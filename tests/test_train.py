"""Single-process training on real MNIST: what a short run learns and records, the recipe, every entry point,
mid-epoch evaluation, bad data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    BIN,
    FIGURES,
    ROOT,
    RUN_FILES,
    SHORT,
    SLICE_TEST_IMAGES,
    TRAIN,
    assert_png,
    call,
    call_with_stdout_closed,
    one_line_error,
    read_metrics,
)

SLICE_EPOCH = ["--epochs", "1", "--batch-size", "256", "--no-progress"]  # on the MNIST slice: 64 steps


@pytest.mark.slow
def test_default_two_epochs_reach_98_percent(tmp_path, data_dir):
    result = call([*TRAIN, "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 1
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert [e["step"] for e in metrics["evaluations"]] == [468, 936]  # once per epoch without a target
    log = metrics["train_log"]  # the series training_curves.png draws: every --log-every (10) steps and epoch end
    assert [entry["step"] for entry in log] == sorted({*range(10, 937, 10), 468, 936})
    assert all(set(entry) == {"step", "epoch", "images", "loss", "lr"} for entry in log)
    assert all(entry["images"] == entry["step"] * 128 and entry["loss"] > 0 and entry["lr"] > 0 for entry in log)
    assert log[-1]["loss"] < log[0]["loss"] and max(e["lr"] for e in log) == pytest.approx(6e-3, rel=0.01)
    assert all(e["eval_samples"] == 10_000 for e in metrics["evaluations"])
    assert metrics["final_test_accuracy"] >= 0.98
    assert metrics["config"]["epochs"] == 2 and Path(metrics["config"]["data_dir"]).resolve() == data_dir
    assert result.stdout.count("/2  train loss") == 2  # one line per epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(RUN_FILES)
    for figure in FIGURES:
        assert_png(tmp_path / figure)


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param([sys.executable, "lenet_dist/train.py"], id="script-in-checkout"),
        pytest.param([str(BIN / "lenet-dist"), "train"], id="console-script"),
        pytest.param([str(BIN / "accelerate"), "launch", "-m", "lenet_dist.train"], id="accelerate-launch-module"),
    ],
)
@pytest.mark.launcher
def test_entry_points_train(launcher, tmp_path, mnist_slice):
    # HF_HOME points at an empty folder so no `accelerate config` file from the developer's machine is used.
    # --resume auto with nothing to resume starts afresh.
    result = call([*launcher, *SLICE_EPOCH, "--resume", "auto", "--output-dir", str(tmp_path / "run")],
                  env={"HF_HOME": str(tmp_path / "hf"), "LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    assert not re.search(r"\w+Warning: ", result.stderr), result.stderr  # none from the project, on either accelerate
    assert "resumed from" not in result.stdout
    assert read_metrics(tmp_path / "run")["final_test_accuracy"] >= 0.9
    assert_png(tmp_path / "run" / "predictions.png")


@pytest.mark.slow
@pytest.mark.launcher
def test_a_finished_run_has_nothing_to_resume_and_is_not_started_over(tmp_path, mnist_slice):
    """The same command on the finished run (a requeue after the last stop) succeeds with nothing to do; without
    --resume auto it is refused: exit 2, or 1 through accelerate's launcher, which reports any failure of its
    child as 1."""
    env = {"HF_HOME": str(tmp_path / "hf"), "LENET_DATA_DIR": str(mnist_slice)}
    command = [*TRAIN, *SLICE_EPOCH, "--resume", "auto", "--output-dir", str(tmp_path / "run")]
    assert call(command, env=env).returncode == 0
    finished = (tmp_path / "run" / "metrics.json").read_bytes()
    for launcher in ([], [str(BIN / "accelerate"), "launch"]):
        launched = [*launcher, *(command[1:] if launcher else command)]
        again = call(launched, env=env, timeout=120)
        assert again.returncode == 0 and "error" not in again.stderr, again.stderr
        assert f"{tmp_path / 'run'} holds a finished run: nothing to resume (--resume auto)" in again.stdout
        refused = call([arg for arg in launched if arg not in ("--resume", "auto")], env=env, timeout=120)
        assert "already holds a finished run" in refused.stderr
        assert refused.returncode == (1 if launcher else 2)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == finished


@pytest.mark.slow
def test_target_accuracy_stops_mid_epoch_and_records_the_step(tmp_path, data_dir):
    # checkpoints fall on evaluation steps here: each is saved after its evaluation, none is skipped
    result = call([*TRAIN, "--target-accuracy", "0.95", "--eval-every", "50",
                  "--checkpoint-every", "50", "--keep-checkpoints", "100", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    steps = [e["step"] for e in metrics["evaluations"]]
    assert steps == list(range(50, 50 * len(steps) + 1, 50))  # every --eval-every steps
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [f"step-{step:08d}" for step in steps]
    latest = json.loads((tmp_path / "checkpoints" / f"step-{steps[-1]:08d}" / "progress.json").read_text())
    assert len(latest["evaluations"]) == len(steps)  # saved after its evaluation
    reached = metrics["reached_target"]
    assert reached == metrics["evaluations"][-1] and reached["test_accuracy"] >= 0.95
    assert all(e["test_accuracy"] < 0.95 for e in metrics["evaluations"][:-1])
    assert reached["epoch"] == 1 and reached["step"] < 468 and metrics["epochs"] == []  # stopped mid-epoch
    assert reached["images"] == reached["step"] * 128
    assert f"reached {reached['test_accuracy']:.2%} at step {reached['step']:,} (epoch 1," in result.stdout
    assert_png(tmp_path / "training_curves.png")


def test_missing_data_is_one_line_error(tmp_path):
    missing = tmp_path / "no-mnist-here"
    result = call([*TRAIN, "--data-dir", str(missing), "--output-dir",
                  str(tmp_path / "out")], timeout=120)
    line = one_line_error(result, 1, str(missing), "--data-dir", "downloading it failed (")
    assert "(RuntimeError)" not in line  # the cause (offline here: the mirrors' own reason), not a type name
    assert not (tmp_path / "out").exists()
    assert not missing.exists()  # the failed download leaves no empty folders behind


@pytest.mark.slow
def test_a_missed_target_is_said_and_recorded_with_the_best_evaluation(tmp_path, mnist_slice):
    result = call([*TRAIN, "--epochs", "1", "--batch-size", "256", "--target-accuracy", "0.995", "--eval-every", "24",
                  "--no-progress", "--output-dir", str(tmp_path)], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr  # a missed target is an answer, not a failure (exit 0)
    metrics = read_metrics(tmp_path)
    best = metrics["best_evaluation"]
    assert metrics["reached_target"] is False and best["test_accuracy"] < 0.995
    assert best == max(metrics["evaluations"], key=lambda e: e["test_accuracy"])
    assert f"target 99.50% not reached; best {best['test_accuracy']:.2%} at step {best['step']:,} (epoch 1)" \
        in result.stdout
    # which clock: evaluations mid-epoch say the time elapsed in all, an epoch's line its training time
    assert re.search(r"step \d+  test accuracy [\d.]+% \([\d,]+ images\)  elapsed [\d.]+ s", result.stdout)
    assert re.search(r"epoch 1/1  train loss [\d.]+  .*  [\d.]+ s training  [\d,]+ images/s", result.stdout)


@pytest.mark.slow
def test_show_without_a_display_says_why_in_one_line(tmp_path, mnist_slice):
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    result = subprocess.run([*TRAIN, "--epochs", "1", "--batch-size", "512", "--no-progress", "--show",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**env, "LENET_DATA_DIR": str(mnist_slice)}, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"--show: no display to open a window on (matplotlib's backend is agg); the figure is " \
           f"{tmp_path / 'predictions.png'}" in result.stdout


@pytest.mark.slow
def test_init_from_starts_from_another_runs_weights(tmp_path, mnist_slice):
    """Training on from a finished run (or fine-tuning on another data set) is a new run: its weights, a fresh
    optimizer and schedule."""
    short = [*TRAIN, "--epochs", "1", "--batch-size", "256", "--no-progress"]
    env = {"LENET_DATA_DIR": str(mnist_slice)}
    first = call([*short, "--output-dir", str(tmp_path / "first")], env=env)
    assert first.returncode == 0, first.stderr
    refused = call([*short, "--epochs", "2", "--output-dir", str(tmp_path / "first")], env=env, timeout=120)
    one_line_error(refused, 2, "already holds a finished run", f"--init-from {tmp_path / 'first'}")
    onward = call([*short, "--init-from", str(tmp_path / "first"), "--output-dir", str(tmp_path / "onward")], env=env)
    assert onward.returncode == 0, onward.stderr
    before, after = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "onward")
    assert after["config"]["init_from"] == str(tmp_path / "first")
    # the same recipe and data from trained weights: a much lower loss from the first step on
    assert after["epochs"][0]["train_loss"] < 0.6 * before["epochs"][0]["train_loss"]


def test_a_reader_that_closes_stdout_stops_the_printing_not_the_run(tmp_path, mnist_sliver):
    """`lenet-dist train … | head -1`: the run goes on and leaves every file; only its printing stops."""
    output = tmp_path / "run"
    read, result = call_with_stdout_closed([*TRAIN, *SHORT, "--output-dir", str(output)], tmp_path / "stdout",
                                           lines=1, env={"LENET_DATA_DIR": str(mnist_sliver)})
    assert read[0].startswith("LeNet-5 on 4,096 mnist images")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert {path.name for path in output.iterdir()} == set(RUN_FILES)
    assert read_metrics(output)["epochs"][0]["epoch"] == 1


def test_every_file_a_run_writes_follows_the_umask(short_run):
    """A shared run folder: the weights too (safetensors writes 0600) are as readable as the umask allows, so that a
    colleague can `predict` from it."""
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {path.relative_to(short_run): path.stat().st_mode & 0o777
             for path in short_run.rglob("*") if path.is_file()}
    assert {path for path, mode in modes.items() if mode != 0o666 & ~umask} == set(), modes
    assert Path("model.safetensors") in modes and Path("checkpoints/step-00000064/model.safetensors") in modes


def test_a_short_run_learns_and_records_every_evaluation_once(short_run):
    metrics = read_metrics(short_run)
    assert metrics["final_test_accuracy"] >= 0.9  # 64 steps of Adam on 16,384 digits
    (epoch,) = metrics["epochs"]
    assert epoch["eval_samples"] == SLICE_TEST_IMAGES and metrics["steps_per_epoch"] == 64
    losses = [entry["loss"] for entry in metrics["train_log"]]
    assert losses[-1] < 0.5 * losses[0]
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (16, 32, 48, 64)]
