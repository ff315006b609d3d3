"""Real `accelerate launch` DDP over gloo with 2 CPU processes, as README's launch table writes it: the same
recipe as one process, rank 0 alone speaks and writes, and each rank's profiler trace is its own."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

from conftest import (
    BIN,
    FIGURES,
    ROOT,
    RUN_FILES,
    SLICE_TEST_IMAGES,
    TRAIN,
    assert_png,
    call,
    free_port,
    launch_table,
    read_metrics,
)
from lenet_dist.profiling.capture import run_trace_dir

pytestmark = [pytest.mark.slow, pytest.mark.ddp, pytest.mark.launcher]


def test_two_process_cpu_ddp_trains_as_one_process_speaks_once_and_profiles_each_rank(tmp_path, mnist_slice):
    """README's "2 CPU processes (gloo)" row as written, with --optimizer muon: per-epoch losses within 0.001 of one
    process's and test accuracy within 0.2 % (the same sums, added in another order; every rank the same Muon
    update); one trace per rank, read back by inspect."""
    recipe = ["--batch-size", "256", "--no-progress", "--optimizer", "muon"]
    env = {"LENET_DATA_DIR": str(mnist_slice), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "HF_HOME": str(tmp_path / "hf")}
    row = launch_table()["2 CPU processes (gloo)"]
    profiled = ["--profile", "--profile-dir", str(tmp_path / "profiles")]
    result = call(["bash", "-c", " ".join([row, *recipe, *profiled, "--output-dir", "two"])], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = call([*TRAIN, *recipe, "--output-dir", str(tmp_path / "one")], env=env)
    assert alone.returncode == 0, alone.stderr
    two, one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert all(e["eval_samples"] == SLICE_TEST_IMAGES for e in two["evaluations"])  # every test image once
    for a, b in zip(two["epochs"], one["epochs"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 and abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.002
    # rank 0 alone prints and writes
    assert result.stdout.count("epoch 1/2  train loss") == 1 and result.stdout.count("epoch 2/2  train loss") == 1
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("profiler traces") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(RUN_FILES)
    for figure in FIGURES:
        assert_png(tmp_path / "two" / figure)

    trace_dir = run_trace_dir(str(tmp_path / "profiles"), tmp_path / "two")
    assert sorted(p.name.split(".")[0] for p in trace_dir.iterdir()) == ["rank0", "rank1"]
    # on a machine without a GPU the profiler's engine says nothing (no start/stop lines, no GPU count errors)
    assert "USDT" not in result.stderr and "gpuGetDeviceCount" not in result.stderr, result.stderr[-2000:]
    assert "CPUAllocator" not in result.stderr, result.stderr[-2000:]  # c10's line about blocks made before
    shown = call([str(BIN / "lenet-dist"), "inspect", str(tmp_path / "two"), "--json", "-"], timeout=120)
    assert shown.returncode == 0, shown.stderr
    workers = json.loads(shown.stdout)["workers"]
    assert list(workers) == ["rank0", "rank1"]
    assert all(w["steps"] == 5 and w["conv_share"] > 0.05 for w in workers.values())
    table = call([str(BIN / "lenet-dist"), "inspect", str(trace_dir)], timeout=120)
    assert "rank0" in table.stdout and "rank1" in table.stdout


def test_muon_ranks_with_different_thread_counts_end_with_the_same_weights(tmp_path):
    """torchrun, two ranks, one and two threads (tests/muon_ranks.py): Newton–Schulz rounds differently on each,
    so each rank orthogonalises its share of the matrices and sends it to the other; after 30 steps of shared
    random batches both hold the same bytes (orthogonalising everything on every rank, they differed)."""
    result = call([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                   str(free_port()), str(ROOT / "tests" / "muon_ranks.py"), "30"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d): ([0-9a-f]{64})", result.stdout))  # the two ranks' lines may interleave
    assert len(digests) == 2 and digests["0"] == digests["1"], result.stdout
