"""The packaged SLURM batch scripts under a real SLURM (slurmctld and two slurmd, tests/slurm.py), submitted with
sbatch and read back as an operator would: `scontrol show job` (state, exit code, restarts) and the job's log."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, SLICE_TEST_IMAGES, TWO_NODE_RECIPE, read_metrics, wait_for
from slurm import Slurm, missing
from test_cluster import Node

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """One SLURM for the module (starting one costs seconds); each test gets it reset by `slurm`."""
    if reason := missing():
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    started = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def slurm(slurm_cluster):
    slurm_cluster.reset()
    return slurm_cluster


def edited(script: str, folder: Path, *, nodes: int = 2) -> Path:
    """The user's copy of a packaged batch script (`lenet-dist launch-config NAME --copy DIR`, as README says),
    edited where its top says: the partition, no GPUs, the CPUs of these 2-CPU nodes, the node count."""
    copied = subprocess.run([str(BIN / "lenet-dist"), "launch-config", script, "--copy", str(folder)],
                            capture_output=True, text=True, check=True)
    path = Path(copied.stdout.strip())
    text = path.read_text().replace("#SBATCH --partition=gpu", "#SBATCH --partition=main")
    text = re.sub(r"#SBATCH --gpus-per-node=\d+.*\n", "", text)
    text = re.sub(r"#SBATCH --cpus-per-task=\d+", "#SBATCH --cpus-per-task=2", text)
    path.write_text(text.replace("#SBATCH --nodes=2", f"#SBATCH --nodes={nodes}"))
    return path


def job_env(slurm: Slurm, tmp_path: Path, mnist_slice: Path, output: str) -> dict[str, str]:
    """No MAIN_PORT: the scripts derive it from the job id, as they do on a cluster."""
    return {"OUTPUT_DIR": str(slurm.cluster.scratch / output), "PROCESSES_PER_NODE": "1",
            "LENET_DATA_DIR": str(mnist_slice), "HF_HOME": str(tmp_path / "hf"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def submit(slurm: Slurm, tmp_path: Path, mnist_slice: Path, *flags: str, nodes: int = 2, output: str = "run",
           sbatch: tuple[str, ...] = (), script: str = "slurm-multi-node", env: dict[str, str] | None = None) -> str:
    folder = Path(tempfile.mkdtemp(prefix="submit-", dir=tmp_path))
    return slurm.submit(edited(script, folder, nodes=nodes), *flags,
                        env={**job_env(slurm, tmp_path, mnist_slice, output), **(env or {})},
                        options=(f"--output={tmp_path}/job-%j.out", f"--chdir={tmp_path}", *sbatch))


def log_of(fields: dict[str, str]) -> str:
    return Path(fields["StdOut"]).read_text()


def clean(log: str) -> bool:
    """What a job log must not carry: a traceback, accelerate's block of defaults, c10d's host name lines."""
    return not re.search(r"Traceback|were not passed to `accelerate launch`|hostname of the client socket", log)


def test_two_jobs_sharing_both_nodes_each_train_as_one_process_and_log_once(slurm, tmp_path, mnist_slice,
                                                                            one_process):
    """Two 2-node jobs at once on the same nodes (each derives its own port from its job id), on a cluster whose
    node names do not resolve on the nodes (the main address is SLURM's NodeAddr), each node's CPUs asked."""
    jobs = [submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, output=output) for output in ("run1", "run2")]
    a, b = slurm.cluster.nodes
    for job, output in zip(jobs, ("run1", "run2"), strict=True):
        fields = slurm.wait_for_state(job, ENDED, 240)
        log = log_of(fields)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), slurm.failure(job, fields)
        assert fields["NodeList"] == "nodea,nodeb" and fields["Restarts"] == "0" and fields["NumCPUs"] == "4"
        assert log.count("epoch 2/2  train loss") == 1 and log.count("wrote ") == 1  # rank 0 alone speaks
        assert clean(log), log[-3000:]
        metrics = read_metrics(a.disk / output)
        assert metrics["world_size"] == 2 and metrics["evaluations"][-1]["eval_samples"] == SLICE_TEST_IMAGES
        assert abs(metrics["final_test_accuracy"] - one_process["final_test_accuracy"]) <= 0.003
        assert not (b.disk / output).exists()  # rank 0 alone writes, on its own node's disk


def rank_processes(node: Node) -> dict[int, dict[str, str]]:
    """The training ranks running on a node: pid → their environment."""
    ranks = {}
    listed = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True).stdout
    for pid in map(int, listed.split()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            variables = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            environ = dict(item.split("=", 1) for item in variables if "=" in item)
        except OSError:
            continue
        if b"lenet_dist.train" in command and "RANK" in environ:
            ranks[pid] = environ
    return ranks


def test_the_single_node_script_gives_each_process_its_share_of_the_cpus_asked(slurm, tmp_path, mnist_slice,
                                                                              one_process):
    """Two CPU processes (cpu-ddp chosen for them) on the node's 2 CPUs: each rank its own core and one thread;
    beside it one process on node b runs without DDP (the single-process config)."""
    a, b = slurm.cluster.nodes
    job = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, "--checkpoint-every", "8", script="slurm-single-node",
                 env={"PROCESSES": "2"}, nodes=1, sbatch=("--nodelist=nodea",))
    alone = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, script="slurm-single-node", output="alone",
                   env={"PROCESSES": "1"}, nodes=1, sbatch=("--nodelist=nodeb",))
    def own_cores() -> bool:  # once the ranks have pinned themselves within the CPUs SLURM bound the task to
        try:
            cores = [os.sched_getaffinity(pid) for pid in rank_processes(a)]
        except OSError:
            return False
        return len(cores) == 2 and len(cores[0] | cores[1]) == 2 and not cores[0] & cores[1]

    wait_for(own_cores, 120)
    assert [environ["OMP_NUM_THREADS"] for environ in rank_processes(a).values()] == ["1", "1"]
    for job_id, output, world in ((job, "run", 2), (alone, "alone", 1)):
        fields = slurm.wait_for_state(job_id, ENDED, 180)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), slurm.failure(job_id, fields)
        assert clean(log_of(fields)), log_of(fields)[-3000:]
        disk = (a if world == 2 else b).disk
        assert read_metrics(disk / output)["world_size"] == world
    assert abs(read_metrics(a.disk / "run")["final_test_accuracy"] - one_process["final_test_accuracy"]) <= 0.003


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


def test_a_lost_node_ends_the_job_in_bounded_time_naming_the_rank_it_lost(slurm, tmp_path, mnist_slice):
    """Node b's slurmd and ranks killed mid-job: rank 0 names the rank it lost within the collective timeout and
    the job ends. (A resubmission resumes from the checkpoint: the rank-0-elsewhere test below.) Submitted with
    --no-requeue: with the script's --requeue SLURM would requeue it on the node failure."""
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


def saved_then_warned(slurm: Slurm, disk: Path, output: str, job: str) -> None:
    """SLURM's time-limit warning (scancel --signal=USR1 --batch) once the job has saved at step 16."""
    wait_for(lambda: (disk / output / "checkpoints" / "step-00000016" / "progress.json").exists(), 120)
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0


def test_a_requeue_that_is_refused_or_capped_ends_the_job_failed_naming_the_checkpoint(slurm, tmp_path,
                                                                                       mnist_slice):
    """One job submitted --no-requeue (SLURM refuses its requeue), one with MAX_REQUEUES=0, side by side: each
    saves at the warning, then ends FAILED (not COMPLETED with its training unfinished), saying why in one line."""
    a, b = slurm.cluster.nodes
    flags = (*TWO_NODE_RECIPE, "--checkpoint-every", "8")
    refused = submit(slurm, tmp_path, mnist_slice, *flags, nodes=1, output="refused",
                     sbatch=("--nodelist=nodea", "--no-requeue"))
    capped = submit(slurm, tmp_path, mnist_slice, *flags, nodes=1, output="capped", sbatch=("--nodelist=nodeb",),
                    env={"MAX_REQUEUES": "0"})
    saved_then_warned(slurm, a.disk, "refused", refused)
    saved_then_warned(slurm, b.disk, "capped", capped)
    for job, why in ((refused, r"SLURM refused to requeue it \(.+\)"),
                     (capped, r"not requeued: requeued 0 times already \(MAX_REQUEUES=0\)")):
        fields = slurm.wait_for_state(job, ENDED, 120)
        log = log_of(fields)
        assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "1:0", "0"), \
            slurm.failure(job, fields)
        lines = re.findall(rf"lenet-dist \(SLURM job {job}\): {why}; resume with OUTPUT_DIR=\S+ \(newest "
                           rf"checkpoint: \S+/checkpoints/step-\d{{8}}\)\n", log)
        assert len(lines) == 1 and clean(log), log[-3000:]
        assert not (a.disk / "refused" / "metrics.json").exists()


def test_a_requeued_job_on_a_node_without_the_checkpoint_stops_instead_of_starting_over(slurm, tmp_path,
                                                                                        mnist_slice):
    """The job saved on node a's own disk; node a is drained, so the requeued attempt lands on node b, whose disk
    has no checkpoint: it says so in one line and ends FAILED rather than training again from step 0."""
    a, b = slurm.cluster.nodes
    job = submit(slurm, tmp_path, mnist_slice, *TWO_NODE_RECIPE, "--checkpoint-every", "8", nodes=1)
    wait_for(lambda: (a.disk / "run" / "checkpoints" / "step-00000016" / "progress.json").exists(), 120)
    assert slurm.run("scontrol", "update", "nodename=nodea", "state=drain", "reason=test").returncode == 0
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    fields = slurm.wait_for_state(job, ("FAILED", "COMPLETED"), 180)
    log = log_of(fields)
    assert (fields["JobState"], fields["Restarts"], fields["NodeList"]) == ("FAILED", "1", "nodeb"), \
        slurm.failure(job, fields)
    assert re.search(r"error: --resume: no checkpoint in \S+/run/checkpoints \(looked on node nodeb; a job "
                     r"restarted on other nodes finds its checkpoints only in an --output-dir every node sees\)",
                     log) and clean(log), log[-3000:]
    assert not (b.disk / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("script", "sbatch", "env", "culprit"), [
    ("slurm-multi-node", ("--partition=nosuch",), {}, "invalid partition specified: nosuch"),
    ("slurm-multi-node", (), {"PROCESSES_PER_NODE": "3"},
     "3 processes per node but 2 CPU(s) asked per node; raise --cpus-per-task or lower the processes"),
    ("slurm-single-node", (), {"CONFIG": "two-gpus"}, "error: no launch config named 'two-gpus'"),
])
def test_bad_input_is_one_line_before_anything_starts(slurm, tmp_path, mnist_slice, script, sbatch, env, culprit):
    folder = tmp_path / "submit"
    folder.mkdir()
    before = slurm.job_ids()
    submitted = slurm.run("sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", f"--chdir={tmp_path}", *sbatch,
                          str(edited(script, folder, nodes=1 if script == "slurm-single-node" else 2)),
                          env=job_env(slurm, tmp_path, mnist_slice, "run") | env)
    if submitted.returncode:  # sbatch itself refused it, in its own words (two lines), and nothing was queued
        assert culprit in submitted.stderr and "Traceback" not in submitted.stderr, submitted.stderr
        assert slurm.job_ids() == before
        return
    fields = slurm.wait_for_state(submitted.stdout.strip(), ENDED, 60)
    log = log_of(fields)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "2:0"), log
    assert culprit in log and len(log.strip().splitlines()) == 1, log
    assert not (slurm.cluster.nodes[0].disk / "run").exists()


def test_slurm_leaves_no_daemon_or_namespace_behind(slurm_cluster):
    """Once closed (as after the module's last test, or a failure): no slurmctld, slurmd or munged of the tests
    runs, and their namespaces are gone."""
    slurm_cluster.close()
    left = subprocess.run(["pgrep", "-f", r"slurm\.conf|munge\.socket"], capture_output=True, text=True).stdout
    assert not [pid for pid in left.split() if int(pid) != os.getpid()], left
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"lnd{os.getpid() % 100_000}" not in namespaces
