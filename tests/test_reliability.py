"""Checkpoints that survive SIGKILL, exact resume, determinism, bad input, rank failure, multi-node."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import BIN, ROOT, read_metrics, run
from test_data import write_split

TRAIN = [sys.executable, "lenet_dist/train.py"]
RECIPE = ["--epochs", "2", "--checkpoint-every", "150"]


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for(predicate, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            pytest.fail(f"process ended early: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.02)


def numbers(metrics: dict) -> list[tuple]:
    return [(e["epoch"], e["train_loss"], e["test_accuracy"], e["eval_samples"]) for e in metrics["epochs"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run([*TRAIN, *RECIPE, "--output-dir", str(output)])
    assert result.returncode == 0, result.stderr
    return output


def test_same_seed_same_numbers(uninterrupted, tmp_path):
    # --deterministic only constrains GPU kernels: on CPU it must not change a single number
    result = run([*TRAIN, *RECIPE, "--deterministic", "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert numbers(read_metrics(tmp_path)) == numbers(read_metrics(uninterrupted))
    assert torch_equal_weights(tmp_path, uninterrupted)


def torch_equal_weights(a: Path, b: Path) -> bool:
    import torch

    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    process = start([*TRAIN, *RECIPE, "--output-dir", str(tmp_path)])
    # step 600 is 131 steps into epoch 2: the resumed run must re-create epoch 2's shuffled order
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000600" / "progress.json").exists(), 120, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "metrics.json").exists()

    resumed = run([*TRAIN, *RECIPE, "--output-dir", str(tmp_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resumed from .*step-0000(06|07)\d\d: epoch 2", resumed.stdout), resumed.stdout
    assert numbers(read_metrics(tmp_path)) == numbers(read_metrics(uninterrupted))
    # identical weights: no step was trained twice or skipped
    assert torch_equal_weights(tmp_path, uninterrupted)


def test_ddp_run_killed_mid_epoch_resumes_to_the_same_accuracy(uninterrupted, tmp_path, data_dir):
    def launch(*extra: str) -> list[str]:
        return [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_ddp.yaml", "--main_process_port",
                str(free_port()), "lenet_dist/train.py", *RECIPE, "--output-dir", str(tmp_path), *extra]

    marker = str(os.getpid())
    process = subprocess.Popen(launch(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "LENET_TEST_LAUNCH": marker})
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000600" / "progress.json").exists(), 180, process)
    # torchrun starts each rank in a session of its own: kill the launcher and every rank, as a
    # machine failure would, or the orphaned ranks would go on writing into the run
    for pid in [process.pid, *rank_pids(int(marker)).values()]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    wait_for(lambda: not rank_pids(int(marker)), 30)
    resumed = run(launch("--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 2 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(e["eval_samples"] == 10_000 for e in metrics["epochs"])
    single = read_metrics(uninterrupted)["final_test_accuracy"]
    assert abs(metrics["final_test_accuracy"] - single) <= 0.001


def test_sigkill_while_saving_leaves_usable_checkpoints(uninterrupted, tmp_path):
    rng = random.Random(0)
    command = [*TRAIN, *RECIPE[:2], "--checkpoint-every", "3", "--keep-checkpoints", "3", "--output-dir", str(tmp_path)]
    for attempt in range(3):
        process = start(command + (["--resume"] if attempt else []))
        checkpoints = tmp_path / "checkpoints"
        already = len(list(checkpoints.glob("step-*"))) if checkpoints.exists() else 0
        wait_for(lambda: checkpoints.exists() and len(list(checkpoints.glob("step-*"))) > already, 120, process)
        time.sleep(rng.uniform(0, 0.3))  # saves every 3 steps: some kills land mid-save
        process.send_signal(signal.SIGKILL)
        process.wait()
        complete = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-"))
        assert complete, "the previous complete checkpoint must survive"
        for checkpoint in complete:
            json.loads((checkpoint / "progress.json").read_text())
            assert load_file(str(checkpoint / "model.safetensors"))
    finished = run(command + ["--resume"])
    assert finished.returncode == 0, finished.stderr
    assert numbers(read_metrics(tmp_path)) == numbers(read_metrics(uninterrupted))
    assert not list((tmp_path / "checkpoints").glob(".*.partial"))


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("defect", ["truncated", "bad-magic", "count-mismatch"])
def test_broken_idx_files_are_named(defect, tmp_path):
    import torch

    data = tmp_path / "data"
    images, labels = torch.zeros(4, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    write_split(data, "train", images, labels)
    write_split(data, "test", images, labels[:3] if defect == "count-mismatch" else labels)
    culprit = data / "t10k-images-idx3-ubyte"
    raw = culprit.read_bytes()
    if defect == "truncated":
        culprit.write_bytes(raw[:-100])
    elif defect == "bad-magic":
        culprit.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    result = run([*TRAIN, "--data-dir", str(data), "--output-dir", str(tmp_path / "out")], timeout=120)
    one_line_error(result, str(culprit))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Adam moves every weight by ~lr on its first step: at 1e36 the next forward overflows float32
    result = run([*TRAIN, "--lr", "1e36", "--schedule", "constant", "--checkpoint-every", "1", "--log-every", "1",
                  "--output-dir", str(tmp_path)], timeout=120)
    one_line_error(result, "by step 2", str(tmp_path / "checkpoints"))
    checkpoints = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000001"]
    assert json.loads((checkpoints[0] / "progress.json").read_text())["global_step"] == 1
    assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_dir) -> Path:
    output = tmp_path_factory.mktemp("short")
    result = run([*TRAIN, "--epochs", "1", "--checkpoint-every", "200", "--output-dir", str(output)])
    assert result.returncode == 0, result.stderr
    return output


def test_resume_refuses_a_checkpoint_from_another_config(short_run, tmp_path):
    checkpoint = short_run / "checkpoints" / "step-00000400"
    result = run([*TRAIN, "--epochs", "1", "--lr", "0.01", "--resume", str(checkpoint),
                  "--output-dir", str(tmp_path)], timeout=120)
    one_line_error(result, str(checkpoint), "--lr 0.003 (this run: 0.01)")


def test_resume_refuses_a_corrupt_checkpoint(short_run, tmp_path):
    import shutil

    checkpoint = tmp_path / "step-00000400"
    shutil.copytree(short_run / "checkpoints" / "step-00000400", checkpoint)
    optimizer = checkpoint / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = run([*TRAIN, "--epochs", "1", "--resume", str(checkpoint), "--output-dir", str(tmp_path / "out")],
                 timeout=120)
    one_line_error(result, str(checkpoint), "corrupt")


def test_finished_run_is_not_overwritten(short_run):
    before = (short_run / "metrics.json").read_bytes()
    result = run([*TRAIN, "--epochs", "1", "--output-dir", str(short_run)], timeout=120)
    one_line_error(result, str(short_run), "--overwrite")
    assert (short_run / "metrics.json").read_bytes() == before


def test_unwritable_output_dir_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run([*TRAIN, "--output-dir", str(blocker / "run")], timeout=120)
    one_line_error(result, str(blocker / "run"), "not writable")


@pytest.mark.parametrize("flags", [["--dataset", "cifar"], ["--mixed-precision", "fp8"],
                                   ["--data-pipeline", "dali"]])
def test_unknown_choices_are_one_line_errors(flags, tmp_path):
    result = run([*TRAIN, *flags, "--output-dir", str(tmp_path / "out")], timeout=120)
    one_line_error(result, flags[0], flags[1])
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_pids(marker: int) -> dict[int, int]:
    """Global rank → pid of the worker processes launched with LENET_TEST_LAUNCH=marker."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if environ.get("TORCHELASTIC_RUN_ID") is not None and environ.get("LENET_TEST_LAUNCH") == str(marker):
            found[int(environ["RANK"])] = int(proc.name)
    return found


def test_a_dying_rank_ends_the_whole_job_quickly(tmp_path, data_dir):
    marker = str(os.getpid())
    process = subprocess.Popen(
        [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_ddp.yaml", "--main_process_port",
         str(free_port()), "lenet_dist/train.py", "--epochs", "5", "--output-dir", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "LENET_TEST_LAUNCH": marker}, start_new_session=True,
    )
    try:
        wait_for(lambda: (tmp_path / "config.json").exists(), 120, process)
        wait_for(lambda: len(rank_pids(int(marker))) == 2, 30, process)
        time.sleep(1)  # inside the training loop, rank 0 waiting on rank 1 in every all-reduce
        ranks = rank_pids(int(marker))
        cores = [os.sched_getaffinity(ranks[rank]) for rank in (0, 1)]
        assert cores[0] and cores[1] and not cores[0] & cores[1]  # --pin-cores: a slice of cores each
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = process.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert re.search(r"rank\s*:\s*1 ", output), output[-3000:]
    assert not (tmp_path / "metrics.json").exists()


def test_two_nodes_on_loopback_match_one_process(uninterrupted, tmp_path, data_dir):
    port = str(free_port())
    nodes = [
        start([str(BIN / "accelerate"), "launch", "--config_file", "launch/multi_node.yaml", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "lenet_dist/train.py", *RECIPE, "--output-dir", str(tmp_path)])
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["world_size"] == 2
    assert all(e["eval_samples"] == 10_000 for e in metrics["epochs"])
    single = read_metrics(uninterrupted)["final_test_accuracy"]
    assert abs(metrics["final_test_accuracy"] - single) <= 0.002 and metrics["final_test_accuracy"] >= 0.98
    assert "epoch 2/2  train loss" in outputs[0][0] and "train loss" not in outputs[1][0]  # machine 1 stays quiet
