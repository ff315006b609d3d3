"""What goes wrong, said in one line: bad data, a NaN loss, bad checkpoints, a full disk, a rank that dies.

Usage errors exit 2, failures on the way exit 1; nothing half-written is left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import (
    BIN,
    ROOT,
    TRAIN,
    free_port,
    kill_all,
    launch_ddp,
    one_line_error,
    rank_pids,
    read_metrics,
    run,
    start,
    wait_for,
)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    # Adam moves every weight by ~lr on its first step: at 1e36 the next forward overflows float32
    result = run([*TRAIN, "--lr", "1e36", "--schedule", "constant", "--checkpoint-every", "1", "--log-every", "1",
                  "--output-dir", str(tmp_path)], timeout=120)
    one_line_error(result, 1, "by step 2", str(tmp_path / "checkpoints"))
    checkpoints = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000001"]
    assert json.loads((checkpoints[0] / "progress.json").read_text())["global_step"] == 1
    assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_dir) -> Path:
    output = tmp_path_factory.mktemp("short")
    result = run([*TRAIN, "--epochs", "1", "--batch-size", "512", "--checkpoint-every", "50", "--output-dir",
                  str(output)])
    assert result.returncode == 0, result.stderr
    return output


def test_resume_refuses_a_checkpoint_from_another_config(short_run, tmp_path):
    checkpoint = short_run / "checkpoints" / "step-00000100"
    result = run([*TRAIN, "--epochs", "1", "--batch-size", "512", "--lr", "0.01", "--resume", str(checkpoint),
                  "--output-dir", str(tmp_path)], timeout=120)
    one_line_error(result, 2, str(checkpoint), "--lr 0.006 (this run: 0.01)")


def test_resume_refuses_a_corrupt_checkpoint(short_run, tmp_path):
    checkpoint = tmp_path / "step-00000100"
    shutil.copytree(short_run / "checkpoints" / "step-00000100", checkpoint)
    state = checkpoint / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    result = run([*TRAIN, "--epochs", "1", "--batch-size", "512", "--resume", str(checkpoint), "--output-dir",
                  str(tmp_path / "out")], timeout=120)
    one_line_error(result, 1, str(checkpoint), "corrupt")


def test_finished_run_is_not_overwritten(short_run):
    before = (short_run / "metrics.json").read_bytes()
    result = run([*TRAIN, "--epochs", "1", "--output-dir", str(short_run)], timeout=120)
    one_line_error(result, 2, str(short_run), "--overwrite")
    assert (short_run / "metrics.json").read_bytes() == before


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run([*TRAIN, "--output-dir", str(blocker / "run")], timeout=120)
    one_line_error(result, 1, str(blocker / "run"), "not writable")


@pytest.mark.slow
@pytest.mark.parametrize(("user", "function", "calls_before", "culprit", "kept"), [
    ("train", "save_checkpoint", 1, "checkpoints/step-00000040", "step-00000020"),
    ("outputs", "export_weights", 0, "model.safetensors", "step-00000117"),
], ids=["checkpoint", "weights"])
def test_a_write_that_fails_is_one_line_and_keeps_the_last_checkpoint(user, function, calls_before, culprit, kept,
                                                                      tmp_path, data_dir):
    """Files limited to 100 kB, as on a disk that fills up: writes fail with EFBIG (Python ignores SIGXFSZ).

    The limit is set from inside the run just before the write under test (a checkpoint is ~0.75 MB: the
    weights and Adam's two moments), after `calls_before` of them went through, so an earlier complete
    checkpoint exists to be kept.
    """
    script = (
        f"import resource, sys; from lenet_dist import {user} as user, train\n"
        f"original, calls = user.{function}, []\n"
        "def limited(*args, **kwargs):\n"
        f"    if len(calls) == {calls_before}:\n"
        "        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "    calls.append(1)\n"
        "    return original(*args, **kwargs)\n"
        f"user.{function} = limited\n"
        "train.main(sys.argv[1:])\n"
    )
    result = run([sys.executable, "-c", script, "--epochs", "1", "--batch-size", "512", "--checkpoint-every", "20",
                  "--keep-checkpoints", "1", "--output-dir", str(tmp_path)], timeout=300)
    line = one_line_error(result, 1, "could not write", "File too large")
    assert culprit in line, line
    (checkpoint,) = (tmp_path / "checkpoints").glob("step-*")
    assert checkpoint.name == kept and (checkpoint / "progress.json").is_file()
    assert not list(tmp_path.rglob("*.partial"))
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.ddp
def test_a_dying_rank_is_named_and_ends_the_whole_job_quickly(tmp_path, data_dir):
    marker = f"dying-{os.getpid()}"
    process = start(launch_ddp("--epochs", "5", "--output-dir", str(tmp_path)), env={"LENET_TEST_LAUNCH": marker})
    try:
        wait_for(lambda: (tmp_path / "config.json").exists(), 120, process)
        wait_for(lambda: len(rank_pids(marker)) == 2, 30, process)
        time.sleep(2)  # inside the training loop, rank 0 waiting on rank 1 in every all-reduce
        ranks = rank_pids(marker)
        cores = [os.sched_getaffinity(ranks[rank]) for rank in (0, 1)]
        assert cores[0] and cores[1] and not cores[0] & cores[1]  # --pin-cores: a slice of cores each
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output, errors = process.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        kill_all(process, marker)
    assert process.returncode != 0
    assert re.search(rf"error: rank 1 \(pid {ranks[1]}\) died \(killed or crashed\); rank 0 stops too", errors), \
        errors[-3000:]
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_on_loopback_match_one_process(short_run, tmp_path, data_dir):
    port = str(free_port())
    recipe = ["--epochs", "1", "--batch-size", "512", "--no-progress", "--output-dir", str(tmp_path)]
    nodes = [
        start([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch" / "multi_node.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip",
               "127.0.0.1", "--main_process_port", port, "-m", "lenet_dist.train", *recipe])
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 2 and metrics["evaluations"][-1]["eval_samples"] == 10_000
    # short_run is this recipe on one process (its checkpoints change no number)
    assert abs(metrics["final_test_accuracy"] - read_metrics(short_run)["final_test_accuracy"]) <= 0.002
    assert "epoch 1/1  train loss" in outputs[0][0] and "train loss" not in outputs[1][0]  # machine 1 stays quiet



def test_a_run_that_fails_leaves_the_process_group(tmp_path):
    """The error path destroys the process group too (NCCL otherwise prints a warning after our one line)."""
    script = (
        "import sys, torch.distributed as dist\n"
        "from lenet_dist import train\n"
        "from lenet_dist.config import TrainConfig\n"
        "from lenet_dist.errors import UsageError\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1)\n"
        f"try:\n    train.run(TrainConfig(resume='latest', output_dir='{tmp_path}/run'))\n"
        "except UsageError as error:\n    print('refused:', error)\n"
        "print('still in a process group:', dist.is_initialized())\n"
    )
    result = run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: --resume: no checkpoint" in result.stdout
    assert "still in a process group: False" in result.stdout
