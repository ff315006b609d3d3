"""A run's processes: joining them (one, or those a launcher started), the accelerator, core pinning, rank 0's voice."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import AutocastKwargs, ProjectConfiguration, TorchDynamoPlugin

from lenet_dist.config import TrainConfig
from lenet_dist.errors import UsageError


def start_processes(collective_timeout: float) -> PartialState:
    """Join the run's processes (one, or those torchrun / accelerate launch started).

    Every collective waits at most `collective_timeout` seconds, so a lost rank ends the job in bounded time
    (torch's default is 10 to 30 minutes). PartialState forms the group that the Accelerator later shares.
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
    """Form the process group under a key prefix of this attempt's own.

    torchrun's static rendezvous (accelerate launch's default) hands restarted workers the first attempt's
    store, whose keys still hold the dead processes' addresses, so an unprefixed group would hang on them.
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
    """Whether this is a multi-process run without GPUs: accelerate then needs cpu=True (MULTI_CPU over
    gloo), or the processes get no backend."""
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
            # CUDA-graph capture needs autocast's weight cache off (it is cleared inside the graph). LeNet
            # uses each weight once per pass, so the cache saved nothing anyway.
            kwargs_handlers=[AutocastKwargs(cache_enabled=False)],
            # --batch-size is the global batch, so the recipe does not change with the number of processes;
            # the seedable sampler gives every rank the same shuffled order to shard.
            dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
            **options,
        )
    except ValueError as error:  # e.g. fp16 on a device that cannot do it
        raise UsageError(f"accelerate refused the configuration: {error}") from None


def pin_cores(state: PartialState) -> None:
    """Give each local CPU process a disjoint slice of the cores it may run on.

    Unpinned, the OS migrates ranks between cores and sometimes stacks two on one. --no-pin-cores turns it off.
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


def precision_label(accelerator: Accelerator) -> str:
    """accelerate's mixed precision, and on CUDA what its fp32 is: PyTorch computes fp32 convolutions in TF32
    there unless told otherwise (torch.backends.cudnn.conv.fp32_precision), matrix products in IEEE fp32."""
    if accelerator.device.type != "cuda" or accelerator.mixed_precision != "no":
        return accelerator.mixed_precision
    tf32 = [name for name, setting in (("convolutions", torch.backends.cudnn.conv.fp32_precision),
                                       ("matmuls", torch.backends.cuda.matmul.fp32_precision)) if setting == "tf32"]
    return f"no (TF32 {' and '.join(tf32)})" if tf32 else "no"
