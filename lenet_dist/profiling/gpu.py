"""The GPU side of a profiler trace: how busy the GPU was in the profiled steps, which host operators launched
its kernels, and how much communication (NCCL) overlapped computation.

Kineto writes GPU work as kernel, gpu_memcpy and gpu_memset events (pid: the device, tid: the stream) and each
host launch as a cuda_runtime or cuda_driver event sharing its args.correlation. ROCm traces use the same
categories with hip* call names, so everything here goes by category.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lenet_dist.profiling.events import (
    GPU_WORK,
    LAUNCHES,
    STEP_MARKER,
    Event,
    Interval,
    Window,
    in_windows,
    intersect,
    length,
    merge,
)

if TYPE_CHECKING:  # rich is imported only when a report is printed
    from rich.console import Console

# The innermost op around an NCCL launch is record_param_comms, which does not name the collective.
COLLECTIVES = ("c10d::", "nccl:")
UNATTRIBUTED = "<unattributed>"
IDLE_GAPS = 3


def is_nccl(kernel_name: str) -> bool:
    return "nccl" in kernel_name.lower()


def short_kernel_name(name: str, width: int = 60) -> str:
    """`void ns::kernel<float, 4>(float*, int)` → `ns::kernel`: templates and arguments fill a table cell."""
    base = re.split(r"[<(]", name.removeprefix("void "), maxsplit=1)[0].strip() or name
    return base if len(base) <= width else base[: width - 1] + "…"


def enclosing(roots: list[Event], start: float, end: float) -> list[Event]:
    """The host ranges around [start, end] on one thread, outermost first.

    Ranges on one thread nest, so at each level of the call tree only the last range starting at or
    before `start` can hold it.
    """
    chain: list[Event] = []
    level = roots
    while level:
        candidate = bisect_right(level, start, key=lambda event: event.start) - 1
        if candidate < 0 or level[candidate].end < end:
            break
        chain.append(level[candidate])
        level = level[candidate].children
    return chain


def launcher(chain: list[Event], nccl: bool) -> str:
    """What a kernel is charged to: the innermost cpu_op around its launch, else the innermost annotation;
    for NCCL, the innermost collective (c10d::…, nccl:…) when there is one."""
    chain = [event for event in chain if not event.name.startswith(STEP_MARKER)]  # a step is not an operator
    collectives = [event for event in chain if nccl and event.name.startswith(COLLECTIVES)]
    ops = [event for event in chain if event.category == "cpu_op"]
    innermost = (collectives or ops or chain or [None])[-1]
    return innermost.name if innermost else UNATTRIBUTED


def analyse_gpu(events: list[Event], trees: dict[Any, list[Event]], windows: list[Window]) -> dict[str, Any] | None:
    """The GPU section of one rank's report; None for a trace without kernels (a CPU run)."""
    work = [event for event in events if event.category in GPU_WORK]
    kernels = [event for event in work if event.category == "kernel"]
    if not kernels:
        return None
    launches = {event.args.get("correlation"): event for event in events if event.category in LAUNCHES}
    in_steps = merge((window.start, window.end) for window in windows)

    def running(selected: Iterable[Event]) -> list[Interval]:
        """When any of the selected GPU work ran, on any stream, inside the step windows."""
        return intersect(merge((event.start, event.end) for event in selected), in_steps)

    all_work = running(work)
    nccl = running(kernel for kernel in kernels if is_nccl(kernel.name))
    overlap_us = length(intersect(nccl, running(kernel for kernel in kernels if not is_nccl(kernel.name))))

    by_operator: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    for kernel in kernels:
        # a kernel belongs to the step it starts in: kernels lag their launch, so going by launch time
        # would charge a step with work the GPU did in the next one
        if not in_windows(kernel.start, windows):
            continue
        launch = launches.get(kernel.args.get("correlation"))
        chain = enclosing(trees.get(launch.thread, []), launch.start, launch.end) if launch else []
        by_operator[launcher(chain, is_nccl(kernel.name))] += kernel.duration
        by_kernel[kernel.name] += kernel.duration

    gaps = []
    for window in windows:
        ran = intersect(all_work, [(window.start, window.end)])
        # idle stretches run from the window's start to the first work, between works, and to its end
        edges = [window.start, *(t for interval in ran for t in interval), window.end]
        gaps += [(end - start, start - window.start, window.name)
                 for start, end in zip(edges[::2], edges[1::2], strict=True) if end > start]

    def per_step(us: float) -> float:
        return us / 1000 / len(windows)

    kernel_us = sum(by_kernel.values())
    nccl_us = sum(us for name, us in by_kernel.items() if is_nccl(name))
    return {
        "busy_share": length(all_work) / sum(window.end - window.start for window in windows),
        "kernel_ms_per_step": per_step(kernel_us),
        "compute_ms_per_step": per_step(kernel_us - nccl_us),
        "nccl_ms_per_step": per_step(nccl_us),
        "nccl_overlap_ms_per_step": per_step(overlap_us),
        "nccl_overlap_share": overlap_us / length(nccl) if nccl else 0.0,
        "idle_gaps": [{"step": step, "offset_ms": offset / 1000, "ms": us / 1000}
                      for us, offset, step in sorted(gaps, key=lambda gap: -gap[0])[:IDLE_GAPS]],
        "kernel_ms_per_step_by_operator": {
            name: per_step(us) for name, us in sorted(by_operator.items(), key=lambda kv: -kv[1])
        },
        "kernel_ms_per_step_by_kernel": {
            name: per_step(us) for name, us in sorted(by_kernel.items(), key=lambda kv: -kv[1])
        },
    }


def print_gpu_report(console: Console, workers: dict[str, dict[str, Any]], top: int) -> None:
    """Three tables, one column per rank: the GPU's time, kernels by launching operator, the top kernels."""
    from rich.table import Table

    gpus = {worker: result["gpu"] for worker, result in workers.items() if "gpu" in result}
    summary = Table(title="GPU time per step (ms): kernels, copies and sets on all streams, inside the steps")
    summary.add_column("")
    for worker in gpus:
        summary.add_column(worker, justify="right")
    rows = [
        ("GPU busy", lambda g: f"{g['busy_share']:.1%}"),
        ("kernels", lambda g: f"{g['kernel_ms_per_step']:.3f}"),
        ("  compute", lambda g: f"{g['compute_ms_per_step']:.3f}"),
        ("  communication (NCCL)", lambda g: f"{g['nccl_ms_per_step']:.3f}"),
        ("NCCL overlapped with compute", lambda g: f"{g['nccl_overlap_ms_per_step']:.3f} "
                                                   f"({g['nccl_overlap_share']:.1%})"),
    ]
    rows += [(f"longest idle gap {n + 1}", lambda g, n=n: _gap(g["idle_gaps"], n)) for n in range(IDLE_GAPS)]
    for label, cell in rows:
        summary.add_row(label, *(cell(g) for g in gpus.values()))
    console.print(summary)
    for key, title, label in (
        ("kernel_ms_per_step_by_operator", "kernel time per step (ms) by launching operator", str),
        ("kernel_ms_per_step_by_kernel", "kernel time per step (ms) by kernel", short_kernel_name),
    ):
        table = Table(title=f"{title}, top {top}")
        table.add_column("operator" if key.endswith("operator") else "kernel")
        for worker in gpus:
            table.add_column(worker, justify="right")
        ranking: dict[str, float] = defaultdict(float)
        for gpu in gpus.values():
            for name, ms in gpu[key].items():
                ranking[name] += ms
        for name in sorted(ranking, key=ranking.get, reverse=True)[:top]:
            table.add_row(label(name), *(f"{gpu[key].get(name, 0):.3f}" for gpu in gpus.values()))
        console.print(table)


def _gap(gaps: list[dict[str, Any]], n: int) -> str:
    if n >= len(gaps):
        return "–"
    gap = gaps[n]
    return f"{gap['ms']:.2f} ms, {gap['step'].removeprefix('ProfilerStep')} +{gap['offset_ms']:.2f} ms"
