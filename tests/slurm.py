"""A real SLURM on this machine for the tests: munged, slurmctld and one slurmd per "node", the nodes being the
network and mount namespaces of test_cluster.Cluster (node-local disks, names in /etc/hosts), all in a
temporary folder, all stopped and removed by `close` however a test ended. Credentials expire after 5 s
(cred_expire=5; SLURM's default 120 s is also how long it holds a requeued job back before it runs again)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from test_cluster import Cluster, Node

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
SLURM_CONF = """\
ClusterName=lenet
SlurmctldHost={a.name}({a.address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sockets}/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={sockets}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.log
MpiDefault=none
ReturnToService=2
SlurmdTimeout=5
SlurmctldTimeout=10
KillWait=20
InactiveLimit=0
MinJobAge=600
{nodes}
PartitionName=main Nodes={a.name},{b.name} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def missing() -> str | None:
    """What this machine lacks to run the tier, in words, or None."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        return "needs root, iproute2 and unshare to make network and mount namespaces"
    absent = [name for name in DAEMONS if not shutil.which(name)]
    return f"needs SLURM and munge (apt-get install slurm-wlm munge): no {', '.join(absent)}" if absent else None


class Slurm:
    """munged in this namespace (its socket is a file, shared by the nodes), slurmctld on node a, a slurmd per
    node; `run` is a SLURM command on node a, as an operator's shell there."""

    def __init__(self, root: Path) -> None:
        self.cluster, self.munged = Cluster(root), None
        # sockets and spool under a short path: a Unix socket's path is at most 108 bytes, which a deeper
        # tmp_path (a longer test name, pytest-xdist's worker folder) passes
        self.sockets = Path(tempfile.mkdtemp(prefix="lnd-slurm-", dir="/tmp"))
        # as on many clusters, a node's name means nothing to the others: SLURM reaches nodes by NodeAddr
        self.cluster.hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
        try:
            self._start(root)
        except BaseException:
            self.close()
            raise

    def _start(self, root: Path) -> None:
        self.folder = root / "slurm"
        (self.folder / "state").mkdir(parents=True)
        self.conf = self.folder / "slurm.conf"
        a, b = self.cluster.nodes
        nodes = "".join(f"NodeName={node.name} NodeAddr={node.address} CPUs=2 State=UNKNOWN\n" for node in (a, b))
        self.conf.write_text(SLURM_CONF.format(a=a, b=b, folder=self.folder, sockets=self.sockets, nodes=nodes))
        (self.folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")  # read beside slurm.conf
        for node in self.cluster.nodes:
            (self.sockets / f"spool-{node.name}").mkdir()
        self.env = {"SLURM_CONF": str(self.conf)}
        key = self.folder / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.munged = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.sockets}/munge.socket",
             f"--pid-file={self.folder}/munged.pid", f"--log-file={self.folder}/munged.log",
             f"--seed-file={self.folder}/munged.seed"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        self._wait(lambda: (self.sockets / "munge.socket").exists(), "munged's socket")
        self.controller = self.cluster.start(a, ["slurmctld", "-D", "-i", "-f", str(self.conf)], self.env)
        self.daemons = {node.name: self.start_slurmd(node) for node in self.cluster.nodes}
        self.wait_idle()

    def wait_idle(self) -> None:
        self._wait(lambda: self.idle_nodes() == 2, "both nodes idle", timeout=60)

    def reset(self) -> None:
        """As if freshly started, for the next test: no job left running, every node's slurmd up (a test may have
        killed one) and the node back in service (or drained), idle, its local disk empty. Jobs that ended stay
        listed (MinJobAge); job ids keep rising."""
        self.run("scancel", "--user=root")
        for node in self.cluster.nodes:
            if self.daemons[node.name].poll() is not None:
                self.daemons[node.name] = self.start_slurmd(node)
        self.run("scontrol", "update", f"nodename={','.join(node.name for node in self.cluster.nodes)}",
                 "state=resume")  # refused, harmlessly, for nodes that were not drained or down
        self.wait_idle()
        for node in self.cluster.nodes:
            for entry in node.disk.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def job_ids(self) -> set[str]:
        return set(re.findall(r"JobId=(\d+)", self.run("scontrol", "show", "jobs").stdout))

    def start_slurmd(self, node: Node) -> subprocess.Popen:
        return self.cluster.start(node, ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)], self.env)

    def run(self, *command: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        process = self.cluster.start(self.cluster.nodes[0], list(command), {**self.env, **(env or {})})
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def idle_nodes(self) -> int:
        shown = self.run("sinfo", "-h", "-o", "%T %D")
        return sum(int(count) for state, count in (line.split() for line in shown.stdout.splitlines())
                   if state == "idle")

    def submit(self, script: Path, *args: str, env: dict[str, str], options: tuple[str, ...] = ()) -> str:
        """sbatch's job id; the job sees this process's environment and `env` (sbatch --export=ALL's)."""
        submitted = self.run("sbatch", "--parsable", *options, str(script), *args, env=env)
        assert submitted.returncode == 0, f"sbatch {script}: {submitted.stderr.strip()}"
        return submitted.stdout.strip().split(";")[0]

    def failure(self, job_id: str, fields: dict[str, str]) -> str:
        """The one line a failed check says: the job, where it ran, how it ended, and where its log is."""
        return (f"job {job_id} on {fields.get('NodeList')}: {fields.get('JobState')} exit {fields.get('ExitCode')} "
                f"restarts {fields.get('Restarts')}; log {fields.get('StdOut')}; SLURM's logs in {self.folder}")

    def kill_node(self, node: Node) -> None:
        """The node is gone: its slurmd and every process in its namespace killed at once."""
        listed = subprocess.run(["ip", "netns", "pids", node.namespace], capture_output=True, text=True)
        for pid in map(int, listed.stdout.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields, as an operator reads them (JobState, ExitCode, Restarts, NodeList, …)."""
        shown = self.run("scontrol", "show", "job", job_id, "-o")
        return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))

    def wait_for_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} on {fields.get('NodeList')}: still {fields.get('JobState')} "
                                     f"after {timeout:.0f} s, not {'/'.join(states)}; log {fields.get('StdOut')}")
            time.sleep(0.5)

    def _wait(self, ready, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                logs = " ".join(str(path) for path in sorted(self.folder.glob("*.log")))
                raise AssertionError(f"SLURM did not start: no {what} after {timeout:.0f} s; logs: {logs}")
            time.sleep(0.2)

    def close(self) -> None:
        self.cluster.close()  # slurmctld, the slurmds, the jobs' processes, the namespaces
        if self.munged is not None and self.munged.poll() is None:
            os.killpg(self.munged.pid, signal.SIGTERM)
            self.munged.wait(timeout=10)
        shutil.rmtree(self.sockets, ignore_errors=True)
