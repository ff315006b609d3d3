"""The processes of a run: the accelerator, core pinning, printing on rank 0, agreeing, and naming a lost rank."""

from __future__ import annotations

import copy
import os
import re
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import AutocastKwargs, ProjectConfiguration, TorchDynamoPlugin, gather_object

from lenet_dist.config import TrainConfig
from lenet_dist.errors import UsageError, UserError

T = TypeVar("T")


def start_processes(collective_timeout: float) -> PartialState:
    """Join the run's processes (one, or the ones torchrun / accelerate launch started).

    Every collective waits at most `collective_timeout` seconds for the other ranks, so a lost node or
    link ends the job in bounded time (torch's default is 10 to 30 minutes). The timeout goes to
    PartialState, the first to form the process group: the Accelerator made later shares that group.
    """
    timeout = timedelta(seconds=collective_timeout)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _join_as_restarted(restarts, timeout)
    return PartialState(cpu=_cpu_processes(), timeout=timeout)


def end_processes() -> None:
    """Leave the process group, on every way out (NCCL otherwise adds its own warning to the last line)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _join_as_restarted(restarts: int, timeout: timedelta) -> None:
    """Form the process group under a prefix of this attempt's own.

    torchrun's static rendezvous (accelerate launch's default) hands restarted workers the first
    attempt's store, whose keys still hold the dead processes' addresses: the new group would try to
    connect to them until it timed out. accelerate then finds the group formed and uses it.
    """
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=5))
    backend = "gloo" if _cpu_processes() else "nccl"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, store=dist.PrefixStore(f"lenet-dist-attempt-{restarts}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def _cpu_processes() -> bool:
    """accelerate's multi-process launcher on a machine without GPUs leaves the processes with no
    backend unless cpu=True, which selects MULTI_CPU over gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(config: TrainConfig, output_dir: Path, logging_dir: Path) -> Accelerator:
    options: dict[str, Any] = {}
    if config.mixed_precision is not None:  # otherwise accelerate's launch config decides
        options["mixed_precision"] = config.mixed_precision
    if config.compile:
        # static shapes: every training batch has the same shape, so one graph serves them all
        options["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", dynamic=False)
    if config.log_with:
        options["log_with"] = config.trackers()
    try:
        return Accelerator(
            cpu=_cpu_processes(),
            # autocast's cache of low-precision weight copies must be off for CUDA-graph capture (PyTorch's
            # CUDA-graph notes: the cache is cleared when the autocast region ends, inside the graph); LeNet
            # uses each weight once per pass, so the cache saved nothing anyway
            kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
            # split_batches: --batch-size is the global batch, so the recipe does not change with the
            # number of processes; the seedable sampler gives every rank the same shuffled order to shard.
            dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
            **options,
        )
    except ValueError as error:  # e.g. fp16 on a device that cannot do it
        raise UsageError(f"accelerate refused the configuration: {error}") from None


def pin_cores(state: PartialState) -> None:
    """Give each local CPU process a disjoint slice of the cores it may run on.

    Left alone, the OS migrates single-threaded ranks between cores and they sometimes share one;
    pinned, each rank keeps its core's caches. --no-pin-cores turns it off.
    """
    if state.device.type != "cpu" or state.num_processes == 1 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    share = len(cores) // local_processes
    if share:
        index = state.local_process_index
        os.sched_setaffinity(0, cores[index * share : (index + 1) * share])


def announce(state: PartialState, message: str) -> None:
    """Print on global rank 0 only: accelerator.print prints once per machine, not once per job."""
    if state.is_main_process:
        print(message, flush=True)


def agree_on_any(problem: UserError | None) -> None:
    """Raise on every rank if any rank met a problem (the first one's, by rank). Rank 0 prints it, so a problem
    met elsewhere names the rank and node that met it."""
    met = [(rank, host, p) for rank, (host, p) in enumerate(gather_object([(socket.gethostname(), problem)]))
           if p is not None]
    if met:
        rank, host, first = met[0]
        if rank:
            first = copy.copy(first)
            first.args = (f"rank {rank} (node {host}): {first}",)
        raise first


def on_every_rank(work: Callable[[], T]) -> T:
    """`work` (reading this rank's own disk, say) on every rank, then agree_on_any: a UserError one rank met
    stops every rank with its one line, instead of leaving the others to find a lost rank."""
    problem, result = None, None
    try:
        result = work()
    except UserError as error:
        problem = error
    agree_on_any(problem)
    return result


class Ranks:
    """Who the other processes are, so that a lost one can be named rather than left to torchrun's log."""

    PROBE_SECONDS = 10  # at most, how long survivors wait for each other to answer through the rendezvous store

    def __init__(self, state: PartialState, collective_timeout: float) -> None:
        self.rank = state.process_index
        # the survivors are stuck in the same collective and time out within moments of each other
        self.probe_seconds = min(self.PROBE_SECONDS, max(1.0, collective_timeout / 2))
        self.members: list[tuple[int, str, int]] = gather_object([(state.process_index, socket.gethostname(),
                                                                    os.getpid())])

    def host(self, rank: int) -> str:
        return f"node {self.members[rank][1]}"

    def lost(self, error: RuntimeError, checkpoints: str) -> UserError | None:
        """The one-line error for a collective that failed because another rank is gone; None when `error`
        is something else (out of memory, a bug), which must keep its traceback."""
        here = socket.gethostname()
        dead = [(rank, pid) for rank, host, pid in self.members if host == here and not _alive(pid)]
        if dead:
            names = ", ".join(f"rank {rank} (pid {pid})" for rank, pid in dead)
            what = f"{names} died (killed or crashed)"
        elif isinstance(error, torch.distributed.DistError) or any(
            word in str(error) for word in ("gloo", "NCCL", "onnection", "Timed out", "timed out")
        ):
            missing = self._unanswered()
            if not missing:  # every rank answered: the collective failed for another reason, its own
                return None
            names = ", ".join(f"rank {rank} ({self.host(rank)})" for rank in missing)
            what = f"lost contact with {names} ({_first_sentence(error)})"
        else:
            return None
        lost = UserError(f"{what}; rank {self.rank} stops too; {checkpoints}. Relaunch with --resume auto to "
                         "continue (torchrun/accelerate launch --max_restarts does it for you)")
        lost.every_rank = True  # each surviving rank says what it saw
        return lost

    def _unanswered(self) -> list[int]:
        """The ranks that do not check in through the rendezvous store within probe_seconds: each survivor
        writes its own key and looks for the others'. Unreachable, the store (on rank 0's node) is lost."""
        address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not address or not port:
            return []
        others = [rank for rank, _, _ in self.members if rank != self.rank]
        prefix = f"lenet-dist/alive/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/" \
                 f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        try:
            # a plain connection first: torch's store client logs every failed attempt, stack traces included
            socket.create_connection((address, int(port)), timeout=self.probe_seconds).close()
            store = torch.distributed.TCPStore(address, int(port), is_master=False,
                                               timeout=timedelta(seconds=self.probe_seconds))
            store.set(prefix + str(self.rank), "1")
            deadline = time.monotonic() + self.probe_seconds
            while True:
                missing = [rank for rank in others if not store.check([prefix + str(rank)])]
                if not missing or time.monotonic() > deadline:
                    return missing
                time.sleep(0.2)
        except (OSError, RuntimeError, ValueError):  # no connection, or the store's own errors
            return [0] if self.rank else others


def _first_sentence(error: Exception) -> str:
    """`[…/pair.cc:561] Connection closed by peer [10.0.0.2]:42931. This is typically…` → `Connection closed by
    peer [10.0.0.2]:42931`."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0])
    return line.split(". ")[0][:120]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True
