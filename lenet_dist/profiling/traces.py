"""The profiler's trace files: finding a run's, loading them, their step windows and call trees.

Traces are Chrome-trace JSON files, `rank<N>.<ms>.pt.trace.json[.gz]`, in a run's trace folder (its
metrics.json names it), in a folder of them, or one such file.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

from lenet_dist.errors import UserError
from lenet_dist.files import read_maybe_gzipped
from lenet_dist.profiling.events import CATEGORIES, HOST, STEP_MARKER, Event, Window

TRACE_NAME = re.compile(r"^(?P<worker>.+?)(\.\d+)?\.pt\.trace\.json(\.gz)?$")
RANK_NAME = re.compile(r"^rank(\d+)$")
# output_dir.METRICS_FILE, spelled here: output_dir imports torch (through checkpoint), which inspect never loads
RUN_METRICS = "metrics.json"
STEP_WINDOWS = "ProfilerStep markers"
WHOLE = "whole trace"
WHOLE_TRACE = f"{WHOLE} (no ProfilerStep markers)"


class Recording(NamedTuple):
    """One trace file's events, and the process that recorded them (`pid 812 on node3`)."""

    events: list[Event]
    process: str


def find_traces(given: Path) -> tuple[Path, dict[str, list[Path]]]:
    """The trace files for what the user named, and the file or folder they are in: a run's output folder
    (its metrics.json's profile_dir), a folder of trace files, or one trace file."""
    if given.is_file():
        match = TRACE_NAME.match(given.name)
        if not match:
            raise UserError(f"{given} is not a *.pt.trace.json[.gz] file; pass a run's output folder, a trace "
                            "folder or one trace file")
        return given, {match["worker"]: [given]}
    if not given.is_dir():
        raise UserError(f"{given} does not exist; pass a run's output folder, a trace folder or one trace file")
    folder = recorded_profile_dir(given) or given
    return folder, trace_files(folder)


def recorded_profile_dir(run_dir: Path) -> Path | None:
    """The trace folder that `run_dir`'s metrics.json records; None without a metrics.json or a recorded one."""
    metrics_path = run_dir / RUN_METRICS
    if not metrics_path.is_file():
        return None
    try:
        recorded = json.loads(metrics_path.read_text()).get("profile_dir")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise UserError(f"{metrics_path} is not readable JSON (truncated or corrupt); pass the run's trace "
                        "folder instead") from None
    if not recorded:  # a run trained without --profile, or before runs recorded where their traces went
        return None
    recorded_dir = Path(recorded)  # train records it as an absolute path
    if recorded_dir.is_dir() and traces_by_worker(recorded_dir):
        return recorded_dir
    raise UserError(f"{metrics_path} records profile_dir {recorded}, which holds no trace files (moved or "
                    "deleted?); pass the folder the traces are in now")


def trace_files(folder: Path) -> dict[str, list[Path]]:
    """A folder's trace files grouped by worker (rank0, rank1, …; several files when the schedule repeats)."""
    workers = traces_by_worker(folder)
    if not workers:
        raise UserError(f"no *.pt.trace.json[.gz] files in {folder}; pass a run's output folder, a trace folder or "
                        "one trace file, recorded with `lenet-dist train --profile`")
    return workers


def traces_by_worker(folder: Path) -> dict[str, list[Path]]:
    workers: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        match = TRACE_NAME.match(path.name)
        if match and path.is_file():
            workers[match["worker"]].append(path)
    return dict(sorted(workers.items(), key=lambda item: _rank_order(item[0])))


def _rank_order(worker: str) -> tuple[int, str]:
    match = RANK_NAME.match(worker)
    return (int(match[1]) if match else 1 << 30, worker)


def load_trace(path: Path) -> Recording:
    try:
        trace = json.loads(read_maybe_gzipped(path))
        raw = trace["traceEvents"]
        host_name = trace.get("host_name")
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path} is not a readable Chrome trace (truncated or corrupt); re-record it") from None
    events = [
        Event(e["name"], e["cat"], float(e["ts"]), float(e["dur"]), (e.get("pid"), e.get("tid")), e.get("args") or {})
        for e in raw
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in CATEGORIES
        and "ts" in e and "dur" in e
    ]
    # host ranges carry the recording process's pid (GPU work carries the device's)
    pids = sorted({str(event.thread[0]) for event in events if event.category in HOST})
    process = f"pid {'/'.join(pids) or '?'}" + (f" on {host_name}" if host_name else "")
    return Recording(events, process)


def count_recordings(processes: list[str], windows: list[Window]) -> tuple[int, str]:
    """How many runs (at least) one worker's trace files come from, and the evidence ("" for one).

    Neither sign holds alone: two pids mean two runs, but a container can give every run the same pid; a
    step number recorded twice means two runs (one profiler numbers its steps on through all its cycles), but
    runs with different schedules record different steps. File stamps and trace clocks cannot tell a repeated
    cycle from a re-run. A resumed run counts as a second one.
    """
    steps = Counter(int(window.name.removeprefix(STEP_MARKER)) for window in windows
                    if window.name.startswith(STEP_MARKER))
    distinct = list(dict.fromkeys(processes))
    step, times = steps.most_common(1)[0] if steps else (None, 1)
    found = []
    if len(distinct) > 1:
        found.append(f"{len(distinct)} processes: {', '.join(distinct)}")
    if times > 1:
        found.append(f"{STEP_MARKER}{step} recorded {times} times")
    return max(len(distinct), times), "; ".join(found)


def step_windows(events: list[Event], path: Path) -> list[Window]:
    """The ProfilerStep ranges; a trace without them (recorded without a schedule) is one window, first to last
    event."""
    steps = [Window(e.name, e.start, e.end) for e in events if e.category in HOST and e.name.startswith(STEP_MARKER)]
    if steps:
        return sorted(steps, key=lambda window: window.start)
    if not events:
        raise UserError(f"{path} holds no profiled events; re-record it with train --profile")
    return [Window(WHOLE, min(e.start for e in events), max(e.end for e in events))]


def nest(events: list[Event]) -> list[Event]:
    """Build the call tree from start/end times (ranges on one thread nest); returns the roots."""
    roots: list[Event] = []
    stack: list[Event] = []
    for event in sorted(events, key=lambda e: (e.start, -e.duration)):
        while stack and event.start >= stack[-1].end:
            stack.pop()
        (stack[-1].children if stack else roots).append(event)
        stack.append(event)
    return roots


def walk(event: Event):
    yield event
    for child in event.children:
        yield from walk(child)
