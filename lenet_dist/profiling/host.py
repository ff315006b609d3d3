"""One rank's host (CPU) view of its traces: self time per operator, the convolution hot path, step times.

Operator times are host-side times; on a GPU they measure launch and synchronisation, so a trace with
kernels also gets the GPU view (gpu.py).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lenet_dist.profiling.events import HOST, STEP_MARKER, Event, Window, in_windows
from lenet_dist.profiling.gpu import analyse_gpu
from lenet_dist.profiling.traces import (
    STEP_WINDOWS,
    WHOLE,
    WHOLE_TRACE,
    count_recordings,
    load_trace,
    nest,
    step_windows,
    walk,
)

CONV_FORWARD = {"aten::conv2d", "aten::convolution"}
CONV_BACKWARD = {"aten::convolution_backward"}


def _layer(event: Event, weight_argument: int) -> str:
    """`conv 1→6` from the weight's shape in the recorded input dims."""
    dims = event.args.get("Input Dims") or []
    if len(dims) > weight_argument and len(dims[weight_argument]) == 4:
        out_channels, in_channels = dims[weight_argument][:2]
        return f"conv {in_channels}→{out_channels}"
    return "conv"


def analyse_worker(paths: list[Path]) -> dict[str, Any]:
    events: list[Event] = []
    windows: list[Window] = []
    processes: list[str] = []
    for path in paths:  # one file per recording cycle; cycles do not overlap in time, so their events pool
        recording = load_trace(path)
        events += recording.events
        windows += step_windows(recording.events, path)
        processes.append(recording.process)
    recordings, recordings_found = count_recordings(processes, windows)
    by_thread: dict[tuple, list[Event]] = defaultdict(list)
    for event in events:
        if event.category in HOST:
            by_thread[event.thread].append(event)
    trees = {thread: nest(host_events) for thread, host_events in by_thread.items()}

    # Steps are ranges on the training thread; on a GPU, autograd runs the backward pass on a
    # thread of its own, so ops are matched to steps by time, not by nesting.
    def in_a_step(event: Event) -> bool:
        return in_windows(event.start, windows)

    self_us: dict[str, float] = defaultdict(float)
    conv_us: dict[str, float] = defaultdict(float)
    for root in (root for roots in trees.values() for root in roots):
        for event in walk(root):
            if not event.name.startswith(STEP_MARKER) and in_a_step(event):
                self_us[event.name] += event.self_time
        _collect_conv(root, conv_us, inside_conv=False, counts=in_a_step)
    step_ms = [(window.end - window.start) / 1000 for window in windows]
    total_us = sum(step_ms) * 1000
    steps_seen = len(step_ms)
    report = {
        "files": [str(p) for p in paths],
        "recordings": recordings,
        "recordings_found": recordings_found,
        "window": WHOLE_TRACE if any(window.name == WHOLE for window in windows) else STEP_WINDOWS,
        "steps": steps_seen,
        "step_ms": {
            "mean": statistics.fmean(step_ms), "median": statistics.median(step_ms),
            "min": min(step_ms), "max": max(step_ms),
        },
        "conv_share": sum(conv_us.values()) / total_us,
        "conv_passes_share": {name: us / total_us for name, us in sorted(conv_us.items(), key=lambda kv: -kv[1])},
        "self_ms_per_step": {
            name: us / 1000 / steps_seen for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])
        },
    }
    gpu = analyse_gpu(events, trees, windows)
    if gpu:
        report["gpu"] = gpu
    return report


def _collect_conv(event: Event, conv_us: dict[str, float], inside_conv: bool, counts) -> None:
    """Inclusive time of the outermost convolution ops, by layer and pass (nested aten calls count once)."""
    if not inside_conv and event.name in CONV_FORWARD | CONV_BACKWARD:
        inside_conv = True
        if counts(event):
            if event.name in CONV_FORWARD:
                conv_us[f"{_layer(event, 1)} forward"] += event.duration
            else:
                conv_us[f"{_layer(event, 2)} backward"] += event.duration
    for child in event.children:
        _collect_conv(child, conv_us, inside_conv, counts)
