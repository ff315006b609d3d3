"""Stopping cleanly on SIGTERM (preemption, `scancel`), SIGINT (Ctrl-C), SIGHUP (the terminal or SSH session
closed) or SIGUSR1 (SLURM's time-limit warning, `--signal=B:USR1@60`).

The handler only notes the signal. The training loop finishes its step, the ranks agree (the signal may
reach one rank first), the run is checkpointed, and the process exits 128 + the signal's number, as a shell
reports a process ended by that signal.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class StopRequest:
    """The first stop signal this process received, if any; later ones change nothing."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def _note(self, number: int, _frame) -> None:
        if self.signal is None:
            self.signal = number

    def agreed(self, device: torch.device) -> int | None:
        """The signal any rank received (the highest number if several did), the same on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signal
        flag = torch.tensor([self.signal or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item()) or None
        if self.signal is None:  # another rank's signal: noted, so later ones stay caught
            self.signal = agreed
        return agreed


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch the stop signals inside the block. The previous handlers come back after it, unless a stop was
    requested: then later signals (a second Ctrl-C) stay caught while the process saves and exits."""
    request = StopRequest()
    previous = {number: signal.signal(number, request._note) for number in STOP_SIGNALS}
    try:
        yield request
    finally:
        if request.signal is None:
            for number, handler in previous.items():
                signal.signal(number, handler)


def signal_name(number: int) -> str:
    return signal.Signals(number).name


class Stopped(Exception):
    """Training stopped on a signal after saving `checkpoint`."""

    def __init__(self, number: int, step: int, checkpoint: Path) -> None:
        self.signal, self.step, self.checkpoint = number, step, checkpoint
        self.exit_status = 128 + number
        super().__init__(
            f"stopped by {signal_name(number)} after step {step}; checkpoint saved: {checkpoint}; "
            "continue with --resume (or --resume auto)"
        )
