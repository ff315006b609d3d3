"""Two real "machines" on one box: two network namespaces joined by a veth pair, each with its own address,
host name (resolvable by both, as on a cluster) and node-local disk (a private mount at the same path), one
rank per node, started as a cluster user starts them: `lenet-dist launch --config_file multi_node.yaml
--machine_rank R …` on each node.

Needs root and iproute2 (`ip netns`); elsewhere these tests are skipped with that reason. The namespaces,
addresses and processes are this module's own and are removed afterwards, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, SLICE_TEST_IMAGES, TRAIN, call, free_port, read_metrics, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ddp, pytest.mark.cluster]
BATCH = 512  # 32 steps per epoch of MNIST_SLICE's 16,384 images
RECIPE = ["--epochs", "2", "--batch-size", str(BATCH), "--no-progress"]
SUBNET = "10.231.77"  # only inside the namespaces below


class Node:
    def __init__(self, index: int, root: Path, tag: str) -> None:
        self.index, self.name = index, f"node{'ab'[index]}"
        self.namespace, self.interface = f"lnd{tag}{index}", f"lnd{tag}v{index}"
        self.address = f"{SUBNET}.{index + 1}"
        self.disk = root / f"{self.name}-disk"  # this node's local disk, mounted at Cluster.scratch on the node
        self.disk.mkdir()


class Cluster:
    """Two nodes; `start` runs a command on one of them, in its namespaces, with its disk at `scratch`."""

    def __init__(self, root: Path) -> None:
        tag = str(os.getpid() % 100_000)
        self.nodes = [Node(index, root, tag) for index in (0, 1)]
        self.scratch = root / "scratch"
        self.scratch.mkdir()
        self.hosts = root / "hosts"  # each node's /etc/hosts: the nodes know each other by name, as on a cluster
        self.hosts.write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(
            f"{node.address} {node.name}\n::ffff:{node.address} {node.name}\n" for node in self.nodes))
        self.processes: list[subprocess.Popen] = []
        a, b = self.nodes
        for node in self.nodes:
            ip("netns", "add", node.namespace)
        ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
        for node in self.nodes:
            ip("link", "set", node.interface, "netns", node.namespace)
            ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface)
            ip("-n", node.namespace, "link", "set", node.interface, "up")
            ip("-n", node.namespace, "link", "set", "lo", "up")

    def start(self, node: Node, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        inside = (f"hostname {node.name} && mount --bind {self.hosts} /etc/hosts && "
                  f"mount --bind {node.disk} {self.scratch} && cd {ROOT} && exec \"$@\"")
        process = subprocess.Popen(
            ["ip", "netns", "exec", node.namespace, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", inside, "sh", *command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.processes.append(process)
        return process

    def launch(self, node: Node, *flags: str, port: int, output: str = "run") -> subprocess.Popen:
        return self.start(node, [*self.launch_command(node, port), *flags, "--output-dir",
                                 str(self.scratch / output)])

    def launch_command(self, node: Node, port: int) -> list[str]:
        return [str(BIN / "lenet-dist"), "launch", "--config_file", str(ROOT / "launch" / "multi_node.yaml"),
                "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node.index),
                "--main_process_ip", self.nodes[0].address, "--main_process_port", str(port),
                "-m", "lenet_dist.train"]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for process in list(_processes_in(self.nodes)):  # ranks the launchers left behind, if any
            os.kill(process, signal.SIGKILL)
        for node in self.nodes:
            subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _processes_in(nodes: list[Node]) -> list[int]:
    pids = []
    for node in nodes:
        listed = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True)
        pids += [int(pid) for pid in listed.stdout.split()]
    return pids


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


@pytest.fixture
def cluster(tmp_path, mnist_slice, monkeypatch):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        message = "needs root, iproute2 and unshare to make network and mount namespaces"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("LENET_DATA_DIR", str(mnist_slice))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, mnist_slice) -> Path:
    output = tmp_path_factory.mktemp("one-process")
    result = call([*TRAIN, *RECIPE, "--output-dir", str(output)], env={"LENET_DATA_DIR": str(mnist_slice)})
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def one_process(one_process_run) -> dict:
    return read_metrics(one_process_run)


def test_a_downed_link_ends_both_nodes_within_the_timeout_naming_the_lost_rank(cluster):
    a, b = cluster.nodes
    timeout = 10
    flags = ["--epochs", "20", "--batch-size", str(BATCH), "--no-progress", "--checkpoint-every", "8",
             "--collective-timeout", str(timeout)]
    port = free_port()
    nodes = [cluster.launch(node, *flags, port=port) for node in cluster.nodes]
    wait_for(lambda: (a.disk / "run" / "checkpoints" / "step-00000008" / "progress.json").exists(), 240, nodes[0])
    ip("-n", b.namespace, "link", "set", b.interface, "down")
    cut = time.monotonic()
    ended = [finish(node, timeout + 90) for node in nodes]
    assert time.monotonic() - cut < timeout + 60  # the timeout, the survivors' check-in, the way out
    for (status, _, stderr), lost in zip(ended, (f"rank 1 (node {b.name})", f"rank 0 (node {a.name})"), strict=True):
        assert status == 1, stderr[-2000:]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: lost contact with {lost}"), stderr[-3000:]
        assert "--resume auto" in lines[0]
    assert f"the newest checkpoint is {cluster.scratch}/run/checkpoints/step-" in ended[0][2]
    assert f"checkpoints are on node {a.name}, rank 0's node" in ended[1][2]


def test_a_file_one_node_lacks_stops_both_with_rank_0_naming_that_node(cluster, one_process_run):
    """--init-from reads each rank's own disk: where node b lacks the weights, every rank stops at once and rank 0
    says which rank and node in one line (not a lost rank, not silence)."""
    a, b = cluster.nodes
    (a.disk / "init").mkdir()
    shutil.copy(one_process_run / "model.safetensors", a.disk / "init")
    port = free_port()
    nodes = [cluster.launch(node, *RECIPE, "--init-from", str(cluster.scratch / "init"), port=port)
             for node in cluster.nodes]
    (status_a, _, err_a), (status_b, _, err_b) = (finish(node, 120) for node in nodes)
    assert status_a == 2 and status_b == 2, (err_a[-2000:], err_b[-2000:])  # a command line that cannot work
    lines = [line for line in err_a.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"error: rank 1 (node {b.name}): --init-from: no model.safetensors in {cluster.scratch}/init"), err_a[-2000:]
    assert "Traceback" not in err_b and "error:" not in err_b, err_b[-2000:]  # said once, by rank 0
    assert not (a.disk / "run").exists() and list(b.disk.iterdir()) == []  # refused before training: nothing left


def test_resume_auto_takes_only_this_runs_checkpoints_not_an_earlier_jobs_on_another_node(cluster, tmp_path,
                                                                                          mnist_slice):
    """Node b's disk holds a later checkpoint of an earlier run into the same path (its rank 0 ran there); node
    a holds this run's config.json and checkpoints up to step 24. --resume auto resumes this run's step 24."""
    a, b = cluster.nodes
    flags = [*RECIPE, "--checkpoint-every", "8", "--keep-checkpoints", "10"]
    for name in ("earlier", "this"):  # two real runs of the same config: two run ids, the second the newer
        result = call([*TRAIN, *flags, "--output-dir", str(tmp_path / name)], env={"LENET_DATA_DIR": str(mnist_slice)})
        assert result.returncode == 0, result.stderr
    (b.disk / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "earlier" / "checkpoints" / "step-00000056", b.disk / "run" / "checkpoints" /
                    "step-00000056")
    (a.disk / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "this" / "config.json", a.disk / "run")
    for step in (8, 16, 24):  # this run, as a job stopped after step 24 left it
        name = f"step-{step:08d}"
        shutil.copytree(tmp_path / "this" / "checkpoints" / name, a.disk / "run" / "checkpoints" / name)
    port = free_port()
    nodes = [cluster.launch(node, *RECIPE, "--resume", "auto", port=port) for node in cluster.nodes]
    (status_a, out_a, err_a), (status_b, _, err_b) = (finish(node, 300) for node in nodes)
    assert status_a == 0 and status_b == 0, (err_a[-2000:], err_b[-2000:])
    assert f"resumed from {cluster.scratch}/run/checkpoints/step-00000024: epoch 1, step 24" in out_a, out_a[-2000:]


REQUEUE = """#!/usr/bin/env bash
# SLURM's --signal=B:USR1@60 with --requeue, as launch/README.md shows it: the batch script traps the warning,
# passes it on as SIGTERM, and (here in a loop, as a requeued job would) runs the same command again.
requeued=0
trap 'kill -TERM "$child"; wait "$child"; stopped=$?; requeued=1' USR1
for attempt in 1 2 3; do
  requeued=0
  "$@" &
  child=$!
  wait "$child"
  status=$?
  if [ "$requeued" = 1 ]; then
    echo "requeued after attempt $attempt (exit $stopped)"; echo "=== requeued" >&2; continue
  fi
  exit "$status"
done
exit 1
"""


def test_a_preempted_two_node_job_saves_requeues_and_finishes_as_one_process(cluster, tmp_path, one_process):
    """A 2-node job whose batch script traps SLURM's warning (USR1), stops every rank with SIGTERM, and runs
    again with --resume auto: both nodes stop after saving (exit 143, one line each), nothing partial is left,
    the second attempt resumes and ends with one process's accuracy; rank 0 alone speaks and writes."""
    a, b = cluster.nodes
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE)
    script.chmod(0o755)
    port = free_port()
    flags = [*RECIPE, "--checkpoint-every", "8", "--resume", "auto", "--output-dir", str(cluster.scratch / "run")]
    nodes = [cluster.start(node, [str(script), *cluster.launch_command(node, port), *flags])
             for node in cluster.nodes]
    wait_for(lambda: (a.disk / "run" / "checkpoints" / "step-00000040" / "progress.json").exists(), 240, nodes[0])
    for node in nodes:
        node.send_signal(signal.SIGUSR1)
    ended = [finish(node, 400) for node in nodes]
    for status, stdout, stderr in ended:
        assert status == 0, stderr[-2000:]
        assert f"requeued after attempt 1 (exit {128 + signal.SIGTERM})" in stdout, stdout[-2000:]
        stopped = [line for line in stderr.split("=== requeued")[0].splitlines() if line.strip()]
        assert "Traceback" not in stderr and re.search(r"lenet-dist launch: SIGTERM: every rank on this node \(1\) "
                                                       r"stopped after saving", stopped[-1]), stderr[-2000:]
    (_, out_a, err_a), (_, out_b, _) = ended
    assert "stopped by SIGTERM after step" in err_a
    assert re.search(r"resumed from .*step-\d{8}: epoch 2", out_a), out_a[-2000:]
    assert "train loss" in out_a and "train loss" not in out_b  # rank 0 alone speaks
    checkpoints = sorted(path.name for path in (a.disk / "run" / "checkpoints").iterdir())
    assert checkpoints and not [name for name in checkpoints if name.startswith(".")]  # no partial folders
    assert list(b.disk.iterdir()) == []  # nothing, not even a partial folder, on node b's own disk
    metrics = read_metrics(a.disk / "run")
    assert metrics["world_size"] == 2 and [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["evaluations"][-1]["eval_samples"] == SLICE_TEST_IMAGES
    assert abs(metrics["final_test_accuracy"] - one_process["final_test_accuracy"]) <= 0.003
    assert json.loads((a.disk / "run" / "config.json").read_text())["resume"] == "auto"


def test_cluster_helpers_leave_nothing_behind():
    """The namespaces of this module's earlier tests are gone (each test's cluster fixture removes its own)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if shutil.which("ip") \
        else ""
    assert f"lnd{os.getpid() % 100_000}" not in listed
