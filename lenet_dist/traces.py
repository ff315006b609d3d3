"""`lenet-dist inspect RUN`: where a training step's time goes, per rank, without TensorBoard.

Reads the Chrome-trace JSON files the profiler wrote (rank<N>.<ms>.pt.trace.json[.gz]): those of a run's
output folder (its metrics.json names their folder), of a folder of them, or one such file. It reports
the operators with the most self time, the share of step time spent in convolutions (forward and
backward, per layer), and step-time statistics, one column per rank so a straggler stands out.
Operator times are host-side (CPU) times; on a GPU they measure launch and synchronisation, so a trace
with kernels also gets a GPU section (gpu_trace.py). `inspect A B` sets two runs side by side.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lenet_dist.config import InspectConfig
from lenet_dist.errors import UserError
from lenet_dist.files import read_maybe_gzipped, write_json
from lenet_dist.gpu_trace import analyse_gpu, print_gpu_report
from lenet_dist.trace_events import CATEGORIES, HOST, STEP_MARKER, Event, Window, in_windows

TRACE_NAME = re.compile(r"^(?P<worker>.+?)(\.\d+)?\.pt\.trace\.json(\.gz)?$")
RANK_NAME = re.compile(r"^rank(\d+)$")
# outputs.METRICS_FILE, spelled here: outputs imports torch, which inspect never loads
RUN_METRICS = "metrics.json"
CONV_FORWARD = {"aten::conv2d", "aten::convolution"}
CONV_BACKWARD = {"aten::convolution_backward"}
STEP_WINDOWS = "ProfilerStep markers"
WHOLE = "whole trace"
WHOLE_TRACE = f"{WHOLE} (no ProfilerStep markers)"


class Recording(NamedTuple):
    """One trace file's events, and the process that recorded them (`pid 812 on node3`)."""

    events: list[Event]
    process: str


def find_traces(given: Path) -> tuple[Path, dict[str, list[Path]]]:
    """The trace files to read for what the user named, and the file or folder they are in: a run's output
    folder (the folder its metrics.json records as profile_dir), a folder of trace files, or one trace file."""
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
    """The trace folder a finished run's metrics.json records, if the folder holds one that records it."""
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
    """How many runs' processes one worker's trace files come from (at least), and what says so ("" for one).

    Two signals, because neither holds alone: each run is a process of its own, so two pids mean two runs,
    but a container can give every run the same pid; and a run's one profiler numbers its steps
    ProfilerStep#0, #1, … on through all its recording cycles, so a step number recorded twice means two
    runs, but runs with different schedules record different steps. The file names' unix-ms stamps and
    the trace's clock (baseTimeNanoseconds) cannot tell a repeated cycle from a re-run, and the number of
    files says nothing without the schedule's --profile-repeat, which the traces do not record. A run
    interrupted and resumed counts as two: a new process, whose profiler starts again at step 0.
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


def inspect_run(given: Path) -> dict[str, Any]:
    """The report on a run's output folder, a trace folder or one trace file (see find_traces)."""
    traces, files = find_traces(given)
    workers = {worker: analyse_worker(paths) for worker, paths in files.items()}
    return {
        "run_dir": str(given),
        "traces": str(traces),
        "workers": workers,
        # a worker whose files come from several runs (or a run and its resumption): its figures pool their steps
        "mixed_runs": {worker: {"recordings": result["recordings"], "found": result["recordings_found"]}
                       for worker, result in workers.items() if result["recordings"] > 1},
    }


def mixed_runs_warning(report: dict[str, Any]) -> str | None:
    """One line saying which workers' traces in the report's folder come from several runs, or None."""
    if not report["mixed_runs"]:
        return None
    found = "; ".join(f"{worker}: {mixed['recordings']} recordings ({mixed['found']})"
                      for worker, mixed in report["mixed_runs"].items())
    return (f"warning: {report['traces']} mixes runs (or a run and its resumption), whose steps are pooled here: "
            f"{found}; to read one run, move the other's rank<N>.<ms> files away")


def _title(report: dict[str, Any]) -> str:
    named, traces = report["run_dir"], _as_typed(report["traces"])
    return f"[bold]{named}[/bold]" + (f" (traces: {traces})" if traces != named else "")


def _as_typed(path: str) -> str:
    """A path under the working directory as a user would type it (a run records its trace folder absolute)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def print_report(report: dict[str, Any], top: int) -> None:
    from rich.table import Table

    from lenet_dist.reporting import wide_console

    workers = report["workers"]
    console = wide_console(100 + 14 * len(workers))
    ranking: dict[str, float] = defaultdict(float)
    for result in workers.values():
        for name, ms in result["self_ms_per_step"].items():
            ranking[name] += ms
    console.print(f"{_title(report)}: {len(workers)} trace worker(s)")
    if any(r["window"] == WHOLE_TRACE for r in workers.values()):
        console.print(f"profiled window: {WHOLE_TRACE}")
    ops = Table(title=f"self time per step (ms), top {top}")
    ops.add_column("operator")
    for worker in workers:
        ops.add_column(worker, justify="right")
    for name in sorted(ranking, key=ranking.get, reverse=True)[:top]:
        ops.add_row(name, *(f"{r['self_ms_per_step'].get(name, 0):.3f}" for r in workers.values()))
    console.print(ops)

    summary = Table(title="steps and the convolution hot path")
    summary.add_column("")
    for worker in workers:
        summary.add_column(worker, justify="right")
    rows = [
        ("profiled steps", lambda r: str(r["steps"])),
        ("step ms (median)", lambda r: f"{r['step_ms']['median']:.2f}"),
        ("step ms (min / max)", lambda r: f"{r['step_ms']['min']:.2f} / {r['step_ms']['max']:.2f}"),
        ("conv fwd+bwd share", lambda r: f"{r['conv_share']:.1%}"),
    ]
    passes = sorted({name for r in workers.values() for name in r["conv_passes_share"]})
    rows += [(f"  {name}", lambda r, n=name: f"{r['conv_passes_share'].get(n, 0):.1%}") for name in passes]
    for label, cell in rows:
        summary.add_row(label, *(cell(r) for r in workers.values()))
    console.print(summary)
    if any("gpu" in r for r in workers.values()):
        print_gpu_report(console, workers, top)


def _change(a: float, b: float) -> dict[str, float | None]:
    return {"a": a, "b": b, "change": b - a, "ratio": b / a if a else None}


def compare_runs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Run B against run A. Each side's figures are the mean over its ranks, so that runs with different
    process counts compare per rank (an operator a rank never ran counts 0 there)."""

    def mean(report: dict[str, Any], figure: Callable[[dict[str, Any]], float]) -> float:
        return statistics.fmean(figure(worker) for worker in report["workers"].values())

    def self_ms(name: str) -> Callable[[dict[str, Any]], float]:
        return lambda worker: worker["self_ms_per_step"].get(name, 0.0)

    names = {name for report in (a, b) for worker in report["workers"].values() for name in worker["self_ms_per_step"]}
    operators = [{"name": name, **_change(mean(a, self_ms(name)), mean(b, self_ms(name)))} for name in names]
    figures: dict[str, Callable[[dict[str, Any]], float]] = {
        "step_ms_median": lambda w: w["step_ms"]["median"],
        "conv_share": lambda w: w["conv_share"],
    }
    if all("gpu" in worker for report in (a, b) for worker in report["workers"].values()):
        figures |= {"gpu_busy_share": lambda w: w["gpu"]["busy_share"],
                    "kernel_ms_per_step": lambda w: w["gpu"]["kernel_ms_per_step"]}
    a_range, b_range = step_ms_range(a), step_ms_range(b)
    return {
        "run_dirs": [a["run_dir"], b["run_dir"]],
        "ranks": [len(a["workers"]), len(b["workers"])],
        "mixed_runs": [a["mixed_runs"], b["mixed_runs"]],
        "self_ms_per_step": sorted(operators, key=lambda row: (-abs(row["change"]), row["name"])),
        "figures": {key: _change(mean(a, figure), mean(b, figure)) for key, figure in figures.items()},
        "step_ms_range": {
            "a": a_range, "b": b_range,
            # a step-time median that moved less than the steps themselves vary is not a measured change
            "within_noise": a_range["min"] <= b_range["max"] and b_range["min"] <= a_range["max"],
        },
    }


def step_ms_range(report: dict[str, Any]) -> dict[str, float]:
    """The shortest and the longest step of any rank: the spread a change in the median is held against
    (over all ranks, so that a straggler's slow steps count as the noise they are)."""
    workers = report["workers"].values()
    return {"min": min(w["step_ms"]["min"] for w in workers), "max": max(w["step_ms"]["max"] for w in workers)}


def noise_verdict(comparison: dict[str, Any]) -> str:
    """Whether B's step time differs from A's by more than their steps vary, in words."""
    spread = comparison["step_ms_range"]
    if spread["within_noise"]:
        return "step time: within noise: the step-time ranges overlap"
    change = comparison["figures"]["step_ms_median"]["change"]
    return f"step time: B−A {change:+.2f} ms, beyond noise: the step-time ranges do not overlap"


def print_comparison(comparison: dict[str, Any], top: int) -> None:
    from rich.table import Table

    from lenet_dist.reporting import wide_console

    console = wide_console(100 + 14 * 4)
    (a, b), (a_ranks, b_ranks) = comparison["run_dirs"], comparison["ranks"]
    spread = comparison["step_ms_range"]
    console.print(f"A: [bold]{a}[/bold] ({a_ranks} rank(s))\nB: [bold]{b}[/bold] ({b_ranks} rank(s))")

    def ratio(row: dict[str, Any]) -> str:
        return "–" if row["ratio"] is None else f"{row['ratio']:.2f}×"

    ops = Table(title=f"self time per step (ms, mean over ranks), top {top} by change")
    for column in ("operator", "A", "B", "B−A", "B/A"):
        ops.add_column(column, justify="left" if column == "operator" else "right")
    for row in comparison["self_ms_per_step"][:top]:
        ops.add_row(row["name"], f"{row['a']:.3f}", f"{row['b']:.3f}", f"{row['change']:+.3f}", ratio(row))
    console.print(ops)

    figures = Table(title="steps (mean over ranks)")
    for column in ("", "A", "B", "B−A", "B/A"):
        figures.add_column(column, justify="left" if not column else "right")
    labels = {"step_ms_median": "step ms (median)", "conv_share": "conv fwd+bwd share",
              "gpu_busy_share": "GPU busy", "kernel_ms_per_step": "kernel ms per step"}
    for key, row in comparison["figures"].items():
        if key.endswith("share"):  # a share's change is in percentage points
            cells = (f"{row['a']:.1%}", f"{row['b']:.1%}", f"{100 * row['change']:+.1f} pp")
        else:
            cells = (f"{row['a']:.2f}", f"{row['b']:.2f}", f"{row['change']:+.2f}")
        figures.add_row(labels[key], *cells, ratio(row))
        if key == "step_ms_median":
            ranges = (f"{spread[side]['min']:.2f} / {spread[side]['max']:.2f}" for side in ("a", "b"))
            figures.add_row("step ms (min / max, all ranks)", *ranges, "overlap" if spread["within_noise"] else "apart",
                            "")
    console.print(figures)
    console.print(noise_verdict(comparison))


def run(config: InspectConfig) -> dict[str, Any]:
    reports = [inspect_run(Path(run_dir)) for run_dir in config.run_dirs]
    for warning in filter(None, map(mixed_runs_warning, reports)):
        print(warning, file=sys.stderr, flush=True)  # on stderr, so that `--json -` stays JSON
    report, show = (compare_runs(*reports), print_comparison) if len(reports) == 2 else (reports[0], print_report)
    if config.json == "-":
        print(json.dumps(report, indent=2))
        return report
    show(report, config.top)
    if config.json:
        write_json(Path(config.json), report)
        print(f"wrote {config.json}")
    return report
