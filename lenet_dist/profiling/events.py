"""What traces.py, host.py and gpu.py share: the events read from a Chrome trace, the windows they are
counted in, the categories that say what an event is, and arithmetic on [start, end) intervals.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

HOST = ("cpu_op", "user_annotation")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")
CATEGORIES = frozenset((*HOST, *GPU_WORK, *LAUNCHES))  # the events analysed; the rest are skipped on load
STEP_MARKER = "ProfilerStep#"

Interval = tuple[float, float]


@dataclass
class Event:
    name: str
    category: str
    start: float  # µs
    duration: float
    thread: tuple[Any, Any]
    args: dict[str, Any]
    children: list[Event] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def self_time(self) -> float:
        return self.duration - sum(child.duration for child in self.children)


class Window(NamedTuple):
    """A stretch of a trace that the figures cover: one profiled step, or the whole trace."""

    name: str
    start: float  # µs
    end: float


def in_windows(start: float, windows: list[Window]) -> bool:
    """Whether an event that starts at `start` belongs to one of the analysed steps."""
    return any(window.start <= start < window.end for window in windows)


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of [start, end) intervals, as sorted disjoint intervals."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The intersection of two unions (each sorted and disjoint, as merge returns them)."""
    common: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            common.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return common


def length(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)
