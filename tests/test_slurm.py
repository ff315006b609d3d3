"""The packaged SLURM batch scripts under a real SLURM (slurmctld and two slurmd, tests/slurm.py), submitted with
sbatch and read back as an operator would: `scontrol show job` (state, exit code, restarts) and the job's log."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, SLICE_TEST_IMAGES, TWO_NODE_RECIPE, free_port, read_metrics, wait_for
from lenet_dist.distributed.launcher import config_path
from slurm import Slurm, missing

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")


@pytest.fixture
def slurm(tmp_path, mnist_slice):
    if reason := missing():
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    started = Slurm(tmp_path)
    try:
        yield started
    finally:
        started.close()


def edited(script: str, folder: Path, *, nodes: int = 2) -> Path:
    """The packaged batch script with what its top says a user edits: the partition, no GPUs, the node count."""
    text = config_path(script).read_text()
    text = text.replace("#SBATCH --partition=gpu", "#SBATCH --partition=main")
    text = re.sub(r"#SBATCH --gpus-per-node=\d+.*\n", "", text)
    text = text.replace("#SBATCH --nodes=2", f"#SBATCH --nodes={nodes}")
    path = folder / Path(script).name
    path.write_text(text)
    return path


def job_env(slurm: Slurm, tmp_path: Path, mnist_slice: Path) -> dict[str, str]:
    return {"OUTPUT_DIR": str(slurm.cluster.scratch / "run"), "MAIN_PORT": str(free_port()),
            "PROCESSES_PER_NODE": "1", "LENET_DATA_DIR": str(mnist_slice), "HF_HOME": str(tmp_path / "hf"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def submit(slurm: Slurm, tmp_path: Path, mnist_slice: Path, *flags: str, nodes: int = 2,
           sbatch: tuple[str, ...] = (), script: str = "slurm-multi-node", env: dict[str, str] | None = None) -> str:
    return slurm.submit(edited(script, tmp_path, nodes=nodes), *flags,
                        env={**job_env(slurm, tmp_path, mnist_slice), **(env or {})},
                        options=(f"--output={tmp_path}/job-%j.out", f"--chdir={tmp_path}", *sbatch))


def log_of(fields: dict[str, str]) -> str:
    return Path(fields["StdOut"]).read_text()


def test_a_two_node_job_trains_as_one_process_and_logs_once(slurm, tmp_path, mnist_slice, one_process):
    job = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE)
    fields = slurm.wait_for_state(job, ENDED, 180)
    log = log_of(fields)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), slurm.failure(job, fields)
    assert fields["NodeList"] == "nodea,nodeb" and fields["Restarts"] == "0"
    assert log.count("epoch 2/2  train loss") == 1 and log.count("wrote ") == 1  # rank 0 alone speaks
    metrics = read_metrics(slurm.cluster.nodes[0].disk / "run")
    assert metrics["world_size"] == 2 and metrics["evaluations"][-1]["eval_samples"] == SLICE_TEST_IMAGES
    assert abs(metrics["final_test_accuracy"] - one_process["final_test_accuracy"]) <= 0.003
    assert list(slurm.cluster.nodes[1].disk.iterdir()) == []  # rank 0 alone writes, on its own node's disk


def test_the_single_node_script_runs_two_processes_on_one_node(slurm, tmp_path, mnist_slice, one_process):
    job = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, script="slurm-single-node",
                 env={"CONFIG": "cpu-ddp", "PROCESSES": "2"})
    fields = slurm.wait_for_state(job, ENDED, 180)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), slurm.failure(job, fields)
    metrics = read_metrics(slurm.cluster.nodes[0].disk / "run")
    assert metrics["world_size"] == 2 and fields["NodeList"] == "nodea"
    assert abs(metrics["final_test_accuracy"] - one_process["final_test_accuracy"]) <= 0.003


def test_the_time_limit_warning_saves_requeues_and_the_requeued_job_resumes(slurm, tmp_path, mnist_slice,
                                                                           one_process):
    """SLURM's --signal=B:USR1 (sent now with scancel --signal=USR1 --batch) reaches the batch script, which
    passes it to every rank: they save at one step, the job requeues itself, and its second run resumes."""
    a = slurm.cluster.nodes[0]
    job = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, "--checkpoint-every", "8")
    wait_for(lambda: (a.disk / "run" / "checkpoints" / "step-00000016" / "progress.json").exists(), 120)
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    fields = slurm.wait_for_state(job, ENDED, 180)
    log = log_of(fields)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        slurm.failure(job, fields)
    assert re.search(r"stopped by SIGUSR1 after step \d+; checkpoint saved", log), log[-3000:]
    assert log.count("lenet-dist launch: SIGUSR1: every rank on this node (1) stopped after saving") == 2  # a, b
    assert re.search(r"resumed from .*checkpoints/step-\d{8}: epoch", log) and "Traceback" not in log, log[-3000:]
    metrics = read_metrics(a.disk / "run")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] and metrics["world_size"] == 2
    assert list(slurm.cluster.nodes[1].disk.iterdir()) == []  # nothing, not even a partial folder, on b's disk
    assert abs(metrics["final_test_accuracy"] - one_process["final_test_accuracy"]) <= 0.003


def test_scancel_ends_every_rank_cleanly_keeping_the_checkpoint(slurm, tmp_path, mnist_slice):
    a = slurm.cluster.nodes[0]
    job = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, "--checkpoint-every", "8")
    wait_for(lambda: (a.disk / "run" / "checkpoints" / "step-00000016" / "progress.json").exists(), 120)
    assert slurm.run("scancel", job).returncode == 0
    fields = slurm.wait_for_state(job, ENDED, 60)
    time.sleep(1)  # the ranks' last lines, after the controller already says CANCELLED
    log = log_of(fields)
    assert fields["JobState"] == "CANCELLED", slurm.failure(job, fields)
    assert "Traceback" not in log and "stopped by SIGTERM after step" in log, log[-3000:]
    checkpoints = sorted(p.name for p in (a.disk / "run" / "checkpoints").iterdir())
    assert checkpoints and not [name for name in checkpoints if name.startswith(".")]
    assert not (a.disk / "run" / "metrics.json").exists()


def test_a_lost_node_ends_the_job_in_bounded_time_and_a_resubmission_finishes(slurm, tmp_path, mnist_slice):
    """Node b's slurmd and ranks killed mid-job: rank 0 names the rank it lost within the collective timeout,
    the job ends; once node b is back, the same job submitted again (--resume auto) finishes from the checkpoint.
    Submitted with --no-requeue: with the script's --requeue SLURM would requeue it on the node failure."""
    a, b = slurm.cluster.nodes
    flags = (*TWO_NODE_RECIPE, "--checkpoint-every", "8", "--collective-timeout", "6")
    job = submit(slurm, tmp_path, mnist_slice, *flags, sbatch=("--no-requeue",))  # else SLURM requeues it itself
    wait_for(lambda: (a.disk / "run" / "checkpoints" / "step-00000016" / "progress.json").exists(), 120)
    lost_at = time.monotonic()
    slurm.kill_node(b)
    fields = slurm.wait_for_state(job, ENDED, 90)
    assert time.monotonic() - lost_at < 60 and fields["JobState"] in ("FAILED", "NODE_FAIL"), \
        slurm.failure(job, fields)
    time.sleep(1)
    assert re.search(r"lost contact with rank 1 \(node nodeb\)|rank 1 .* died", log_of(fields)), \
        log_of(fields)[-3000:]
    slurm.daemons[b.name] = slurm.start_slurmd(b)
    slurm.wait_idle()
    again = submit(slurm, tmp_path, mnist_slice, *flags)
    fields = slurm.wait_for_state(again, ENDED, 180)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), slurm.failure(again, fields)
    assert re.search(r"resumed from .*checkpoints/step-\d{8}", log_of(fields)), log_of(fields)[-3000:]


def test_a_resubmission_with_rank_0_on_the_node_without_the_checkpoint_resumes(slurm, tmp_path, mnist_slice):
    """The first job ran on node b alone (its checkpoints on b's disk) and was stopped; the next one runs on both
    nodes, rank 0 on node a, whose disk has nothing: rank 1 reads the checkpoint and sends it to rank 0."""
    a, b = slurm.cluster.nodes
    flags = (*TWO_NODE_RECIPE, "--checkpoint-every", "8")
    first = submit(slurm, tmp_path, mnist_slice, *flags, nodes=1, sbatch=("--nodelist=nodeb",))
    wait_for(lambda: (b.disk / "run" / "checkpoints" / "step-00000016" / "progress.json").exists(), 120)
    assert slurm.run("scancel", first).returncode == 0
    slurm.wait_for_state(first, ENDED, 60)
    slurm.wait_idle()
    assert not (a.disk / "run").exists()
    second = submit(slurm, tmp_path, mnist_slice, *flags)
    fields = slurm.wait_for_state(second, ENDED, 180)
    log = log_of(fields)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), slurm.failure(second, fields)
    assert re.search(r"resumed from .*checkpoints/step-\d{8}: epoch \d, step \d+ \(saved by 1 processes\)", log), \
        log[-3000:]
    assert read_metrics(a.disk / "run")["world_size"] == 2


def test_slurm_leaves_no_daemon_or_namespace_behind():
    """After the tests above: no slurmctld, slurmd or munged of theirs runs, and their namespaces are gone."""
    left = subprocess.run(["pgrep", "-f", r"slurm\.conf|munge\.socket"], capture_output=True, text=True).stdout
    assert not [pid for pid in left.split() if int(pid) != os.getpid()], left
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout \
        if not missing() else ""
    assert f"lnd{os.getpid() % 100_000}" not in namespaces
