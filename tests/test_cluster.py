"""Two real "machines" on one box: two network namespaces joined by a veth pair, each with its own address,
host name (resolvable by both, as on a cluster) and node-local disk (a private mount at the same path), one
rank per node, started as a cluster user starts them: `lenet-dist launch --config_file multi_node.yaml
--machine_rank R …` on each node.

Needs root and iproute2 (`ip netns`); elsewhere these tests are skipped with that reason. The namespaces,
addresses and processes are this module's own and are removed afterwards, also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TRAIN, TWO_NODE_RECIPE, call, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ddp, pytest.mark.cluster]
RECIPE = TWO_NODE_RECIPE
BATCH = 512  # TWO_NODE_RECIPE's: 32 steps per epoch of MNIST_SLICE's 16,384 images
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


def test_cluster_helpers_leave_nothing_behind():
    """The namespaces of this module's earlier tests are gone (each test's cluster fixture removes its own)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if shutil.which("ip") \
        else ""
    assert f"lnd{os.getpid() % 100_000}" not in listed
