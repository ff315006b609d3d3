"""Real `accelerate launch` DDP over gloo with 2 CPU processes: the same recipe, rank 0 alone speaks and writes."""

from __future__ import annotations

import pytest

from conftest import FIGURES, RUN_FILES, assert_png, launch_ddp, read_metrics, run

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_two_process_cpu_ddp_trains_once_and_speaks_once(tmp_path, data_dir):
    # batch 512: two short epochs (the recipe's accuracy on 2 processes, over seeds, is the benchmark's)
    result = run(launch_ddp("--batch-size", "512", "--output-dir", str(tmp_path)))
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 2
    assert all(e["eval_samples"] == 10_000 for e in metrics["evaluations"])  # every test image once
    assert metrics["final_test_accuracy"] >= 0.97
    # rank 0 alone prints and writes
    assert result.stdout.count("epoch 1/2  train loss") == 1 and result.stdout.count("epoch 2/2  train loss") == 1
    assert result.stdout.count("wrote ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(RUN_FILES)
    for figure in FIGURES:
        assert_png(tmp_path / figure)
