"""Real `accelerate launch` DDP over gloo with 2 CPU processes: the same recipe, rank 0 alone speaks and writes."""

from __future__ import annotations

import pytest

from conftest import FIGURES, RUN_FILES, SLICE_TEST_IMAGES, TRAIN, assert_png, call, launch_ddp, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_two_process_cpu_ddp_trains_as_one_process_and_speaks_once(tmp_path, mnist_slice):
    """README: two processes follow one process's recipe, per-epoch losses within 0.001 and test accuracy within
    0.2 % (the same sums, added in another order)."""
    recipe = ["--batch-size", "256", "--no-progress"]
    env = {"LENET_DATA_DIR": str(mnist_slice)}
    result = call(launch_ddp(*recipe, "--output-dir", str(tmp_path / "two")), env=env)
    assert result.returncode == 0, result.stderr
    alone = call([*TRAIN, *recipe, "--output-dir", str(tmp_path / "one")], env=env)
    assert alone.returncode == 0, alone.stderr
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert all(e["eval_samples"] == SLICE_TEST_IMAGES for e in two["evaluations"])  # every test image once
    for a, b in zip(two["epochs"], one["epochs"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 and abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.002
    # rank 0 alone prints and writes
    assert result.stdout.count("epoch 1/2  train loss") == 1 and result.stdout.count("epoch 2/2  train loss") == 1
    assert result.stdout.count("wrote ") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(RUN_FILES)
    for figure in FIGURES:
        assert_png(tmp_path / "two" / figure)
