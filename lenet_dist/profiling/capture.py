"""torch.profiler over a scheduled window of training steps, one Chrome-trace file per rank.

Files are `profiles/<run>/rank<N>.<unix-ms>.pt.trace.json`: torch_tb_profiler reads `rank<N>` as the worker
and the stamp as the span, and ranks never overwrite each other. The default handler names files by host and
pid, not rank.
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


def remove_traces(folder: Path, worker: str) -> None:
    """A worker's traces of an earlier run into the same folder, which a fresh run's must not mix with."""
    for stale in folder.glob(f"{worker}.*"):
        stale.unlink()


def traced(folder: Path, worker: str) -> bool:
    """Whether the worker has a trace in the folder."""
    return any(folder.glob(f"{worker}.*{TRACE_SUFFIX}"))


def no_trace_line(steps: int, wait: int, warmup: int, active: int) -> str:
    """Why --profile left no trace (the run ended before the profiler's window) and the flags that fit the window
    into the run's steps."""
    fit = (f"--profile-wait {steps - warmup - active}" if steps >= warmup + active
           else f"--profile-wait 0 --profile-active {steps - warmup}" if steps > warmup
           else f"--profile-wait 0 --profile-warmup 0 --profile-active {max(steps, 1)}")
    return (f"--profile: no trace recorded: the run had {steps} steps, and the profiler's window starts at step "
            f"{wait + warmup + 1} (--profile-wait {wait} --profile-warmup {warmup}); use {fit}")


def trace_writer(folder: Path, worker: str):
    """The on_trace_ready handler: each recording cycle's trace, written by its rank to its own disk. A failed
    write is one warning line from that rank, and training goes on."""
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
        # Kineto logs its start, stop and "gpuGetDeviceCount failed" even with no GPU traced. It reads this
        # when the profiler starts, so setting it here works; a user's own setting wins.
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
    """The profiler, stopped only once every rank's collectives are done.

    Gloo's threads close an all-reduce's profiler range after DDP has the result; stopping the recording
    meanwhile can abort the process (`terminate called without an active exception`), so a barrier comes first.
    """

    def __init__(self, profiler: profile) -> None:
        self.profiler = profiler
        # c10 logs "Memory block of unknown size was allocated before the profiling started" from C++, with no
        # setting to stop it, at the first free of a block made earlier: these take that free, with stderr closed.
        self.made_before = {ProfilerAction.WARMUP: torch.empty(1), ProfilerAction.RECORD: torch.empty(1)}

    @staticmethod
    def batches(items: Iterable[Item]) -> Iterator[Item]:
        """The batches, each fetch a "data_loading" range in the trace."""
        return labelled(items, "data_loading")

    def step(self) -> None:
        if self.profiler.current_action == ProfilerAction.RECORD_AND_SAVE:  # this step stops the recording
            self.settle()
        self.profiler.step()
        phase = self.profiler.current_action
        phase = ProfilerAction.RECORD if phase == ProfilerAction.RECORD_AND_SAVE else phase
        if phase in self.made_before:  # the first warm-up step and the first recorded one
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

    @staticmethod
    def batches(items: Iterable[Item]) -> Iterable[Item]:
        return items

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
