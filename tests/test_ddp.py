"""Real `accelerate launch` DDP over gloo with 2 CPU processes."""

from __future__ import annotations

from conftest import BIN, FIGURES, RUN_FILES, assert_png, read_metrics, run


def test_two_process_cpu_ddp_matches_the_recipe(tmp_path, data_dir):
    result = run(
        [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_ddp.yaml", "lenet_dist/train.py",
         "--output-dir", str(tmp_path)]
    )
    assert result.returncode == 0, result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 2
    assert all(e["eval_samples"] == 10_000 for e in metrics["epochs"])
    assert metrics["final_test_accuracy"] >= 0.98
    # rank 0 alone prints and writes
    assert result.stdout.count("epoch 1/2  train loss") == 1 and result.stdout.count("epoch 2/2  train loss") == 1
    assert result.stdout.count("epoch 1/2  step 469/469") <= 1
    assert result.stdout.count("wrote ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(RUN_FILES)
    for figure in FIGURES:
        assert_png(tmp_path / figure)
