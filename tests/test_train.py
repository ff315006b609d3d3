"""Single-process training through every entry point, on real MNIST."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import BIN, assert_png, read_metrics, run


def test_default_two_epochs_reach_98_percent(tmp_path, data_dir):
    result = run([sys.executable, "-m", "lenet_dist.train", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 1
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(e["eval_samples"] == 10_000 for e in metrics["epochs"])
    assert metrics["final_test_accuracy"] >= 0.98
    assert metrics["config"]["epochs"] == 2 and Path(metrics["config"]["data_dir"]).resolve() == data_dir
    assert result.stdout.count("/2  train loss") == 2  # one line per epoch
    assert_png(tmp_path / "predictions.png")


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param([sys.executable, "lenet_dist/train.py"], id="python-script"),
        pytest.param([str(BIN / "lenet-dist"), "train"], id="console-script"),
        pytest.param([str(BIN / "accelerate"), "launch", "lenet_dist/train.py"], id="accelerate-launch"),
    ],
)
def test_entry_points_train_one_epoch(launcher, tmp_path, data_dir):
    # HOME points at an empty folder so no `accelerate config` file from the developer's machine is used.
    result = run([*launcher, "--epochs", "1", "--output-dir", str(tmp_path)], env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["epochs"][0]["eval_samples"] == 10_000
    assert metrics["final_test_accuracy"] > 0.95
    assert_png(tmp_path / "predictions.png")


def test_missing_data_is_one_line_error(tmp_path):
    missing = tmp_path / "no-mnist-here"
    result = run(
        [sys.executable, "lenet_dist/train.py", "--data-dir", str(missing), "--output-dir", str(tmp_path / "out")],
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(missing) in lines[0] and "--data-dir" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "culprit"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--workers", "-1"], "--workers"),
    ],
)
def test_invalid_flags_are_one_line_errors(flags, culprit, tmp_path):
    result = run([sys.executable, "lenet_dist/train.py", *flags, "--output-dir", str(tmp_path / "out")], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and culprit in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag_with_defaults():
    result = run([str(BIN / "lenet-dist"), "train", "--help"], timeout=60)
    assert result.returncode == 0
    for option in ("--epochs", "--batch-size", "--lr", "--seed", "--data-dir", "--output-dir", "-j WORKERS, --workers"):
        assert option in result.stdout
    assert "(default: 2)" in result.stdout
