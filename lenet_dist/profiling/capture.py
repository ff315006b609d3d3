"""torch.profiler over a scheduled window of training steps, one Chrome-trace file per rank.

Files are `profiles/<run>/rank<N>.<unix-ms>.pt.trace.json`: torch_tb_profiler reads `rank<N>` as the
worker name and the millisecond stamp as the span, so ranks never overwrite each other (the default
handler names files by host and pid, which says nothing about which rank wrote them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.profiler import ProfilerAction, ProfilerActivity, profile, record_function, schedule

from lenet_dist.errors import UserError
from lenet_dist.files import write_atomically

TRACE_SUFFIX = ".pt.trace.json"
Item = TypeVar("Item")


def run_trace_dir(profile_dir: str, output_dir: Path) -> Path:
    """This run's own folder of traces: `<profile_dir>/<output dir's name>-<8 hex digits of its absolute path>`,
    so that two runs called `run` in different places never pool their traces in one folder."""
    digest = hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:8]
    return Path(profile_dir) / f"{output_dir.name}-{digest}"


def trace_writer(folder: Path, worker: str):
    """Each recording cycle's trace, written by the rank that made it onto its own disk. One that cannot be
    written is said in one line by that rank (no other rank knows of it); training and the checkpoints go on."""
    def write(profiler: profile) -> None:
        final = folder / f"{worker}.{time.time_ns() // 1_000_000}{TRACE_SUFFIX}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(final, lambda partial: profiler.export_chrome_trace(str(partial)))
        except UserError as error:  # a failed write: write_atomically's one line
            print(f"warning: {worker}: {error}; its profiler trace is lost, training goes on", file=sys.stderr,
                  flush=True)
        except OSError as error:  # the folder
            print(f"warning: {worker}: cannot make {folder} for its profiler trace ({error.strerror}); training goes "
                  "on", file=sys.stderr, flush=True)

    return write


@contextlib.contextmanager
def step_profiler(
    folder: Path, worker: str, *, wait: int, warmup: int, active: int, repeat: int, with_flops: bool
) -> Iterator[SettledProfiler]:
    """A started profiler; call `.step()` after every training step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    if ProfilerActivity.CUDA not in activities:
        # Kineto, the profiler's engine, prints its start and stop and "gpuGetDeviceCount failed" even when no GPU
        # is traced; it reads this when it starts, so it still applies here (a user's own setting wins)
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
        on_trace_ready=trace_writer(folder, worker),
        record_shapes=True,
        profile_memory=True,
        with_flops=with_flops,
    ) as profiler:
        settled = SettledProfiler(profiler)
        yield settled
        if profiler.current_action != ProfilerAction.NONE:  # leaving the block stops a recording in progress
            settled.settle()


class SettledProfiler:
    """The profiler, stopped only once every rank's collectives are finished with.

    Gloo's threads run the profiler's bookkeeping of an all-reduce (the end of its `gloo:all_reduce`
    range) after DDP already has the result: a rank that stopped recording meanwhile tore the trace down
    under that thread, and aborted now and then (`terminate called without an active exception`). A
    barrier first waits for every collective in flight, bookkeeping included.
    """

    def __init__(self, profiler: profile) -> None:
        self.profiler = profiler
        # Freed first once memory is recorded: c10 logs "Memory block of unknown size was allocated before the
        # profiling started" at the 1st (and every 1000th) free of a block made earlier, a C++ line per rank
        # that no setting turns off; that first free is this block's, with stderr closed for the moment.
        self.made_before = {ProfilerAction.WARMUP: torch.empty(1), ProfilerAction.RECORD: torch.empty(1)}

    def step(self) -> None:
        if self.profiler.current_action == ProfilerAction.RECORD_AND_SAVE:  # this step stops the recording
            self.settle()
        self.profiler.step()
        phase = self.profiler.current_action
        phase = ProfilerAction.RECORD if phase == ProfilerAction.RECORD_AND_SAVE else phase
        if phase in self.made_before:  # the first warm-up step (memory may be recorded from it), the first recorded
            with stderr_closed():
                del self.made_before[phase]

    @staticmethod
    def settle() -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()


@contextlib.contextmanager
def stderr_closed() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null, for what C++ code writes there directly."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class NoProfiler:
    """Stands in when --profile is off, so the train loop has one code path."""

    def step(self) -> None:
        pass


def labelled(items: Iterable[Item], name: str) -> Iterator[Item]:
    """Yield from `items`, each fetch inside a profiler range called `name` (e.g. data loading)."""
    iterator = iter(items)
    while True:
        with record_function(name):
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


def profiler_for(config: Any, folder: Path, worker: str) -> contextlib.AbstractContextManager:
    """The profiler the config asks for (its profile_* fields), or a stand-in that does nothing."""
    if not config.profile:
        return contextlib.nullcontext(NoProfiler())
    return step_profiler(
        folder, worker, wait=config.profile_wait, warmup=config.profile_warmup, active=config.profile_active,
        repeat=config.profile_repeat, with_flops=config.profile_flops,
    )
