"""Naming a lost rank: when a collective fails because a rank, node or link went away, each survivor says
which one in one line, instead of torchrun's stack of tracebacks."""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from lenet_dist.errors import RankError


class Ranks:
    """Who the other processes are, so that a lost one can be named."""

    PROBE_SECONDS = 10  # longest wait for the other survivors to answer through the rendezvous store

    def __init__(self, state: PartialState, collective_timeout: float) -> None:
        self.rank = state.process_index
        # survivors time out of the same collective within moments of each other
        self.probe_seconds = min(self.PROBE_SECONDS, max(1.0, collective_timeout / 2))
        self.members: list[tuple[int, str, int]] = gather_object([(state.process_index, socket.gethostname(),
                                                                    os.getpid())])

    def host(self, rank: int) -> str:
        return f"node {self.members[rank][1]}"

    def lost(self, error: RuntimeError, checkpoints: str) -> RankError | None:
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
            if not missing:  # every rank answered: the failure is something else
                return None
            names = ", ".join(f"rank {rank} ({self.host(rank)})" for rank in missing)
            what = f"lost contact with {names} ({_first_sentence(error)})"
        else:
            return None
        return RankError(f"{what}; rank {self.rank} stops too; {checkpoints}. Relaunch with --resume auto to "
                         "continue (torchrun/accelerate launch --max_restarts does it for you)")

    def _unanswered(self) -> list[int]:
        """The ranks that do not check in through the rendezvous store within probe_seconds. An unreachable
        store (it lives on rank 0's node) means rank 0 is lost, or to rank 0 itself, all the others."""
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
