"""`lenet-dist inspect profiles/<run>`: where a training step's time goes, per rank, without TensorBoard.

Reads the Chrome-trace JSON files the profiler wrote (rank<N>.<ms>.pt.trace.json[.gz]) and reports
the operators with the most self time, the share of step time spent in convolutions (forward and
backward, per layer), and step-time statistics, one column per rank so a straggler stands out.
Times are host-side (CPU) op times; on a GPU they measure launch and synchronisation, not kernels.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_dist.config import InspectConfig
from lenet_dist.errors import UsageError, UserError
from lenet_dist.files import write_json

TRACE_NAME = re.compile(r"^(?P<worker>.+?)(\.\d+)?\.pt\.trace\.json(\.gz)?$")
RANK_NAME = re.compile(r"^rank(\d+)$")
CONV_FORWARD = {"aten::conv2d", "aten::convolution"}
CONV_BACKWARD = {"aten::convolution_backward"}


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


def trace_files(run_dir: Path) -> dict[str, list[Path]]:
    """Trace files grouped by worker (rank0, rank1, …; several files when the schedule repeats)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; pass profiles/<run> as written by train --profile")
    workers: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(run_dir.iterdir()):
        match = TRACE_NAME.match(path.name)
        if match and path.is_file():
            workers[match["worker"]].append(path)
    if not workers:
        raise UserError(f"no *.pt.trace.json files in {run_dir}; record some with `lenet-dist train --profile`")
    return dict(sorted(workers.items(), key=lambda item: _rank_order(item[0])))


def _rank_order(worker: str) -> tuple[int, str]:
    match = RANK_NAME.match(worker)
    return (int(match[1]) if match else 1 << 30, worker)


def load_events(path: Path) -> list[Event]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        trace = json.loads(raw)
        events = trace["traceEvents"]
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a readable Chrome trace (truncated or corrupt); re-record it") from None
    return [
        Event(e["name"], e.get("cat", ""), float(e["ts"]), float(e["dur"]), (e.get("pid"), e.get("tid")), e.get("args") or {})
        for e in events
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")
        and "ts" in e and "dur" in e
    ]


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
    step_ms: list[float] = []
    self_us: dict[str, float] = defaultdict(float)
    conv_us: dict[str, float] = defaultdict(float)
    for path in paths:
        by_thread: dict[tuple, list[Event]] = defaultdict(list)
        for event in load_events(path):
            by_thread[event.thread].append(event)
        trees = [root for events in by_thread.values() for root in nest(events)]
        steps = [e for root in trees for e in walk(root) if e.name.startswith("ProfilerStep#")]
        step_ms += [step.duration / 1000 for step in steps]

        # Steps are ranges on the training thread; on a GPU, autograd runs the backward pass on a
        # thread of its own, so ops are matched to steps by time, not by nesting.
        def in_a_step(event: Event) -> bool:
            return any(step.start <= event.start < step.end for step in steps)

        for root in trees:
            for event in walk(root):
                if not event.name.startswith("ProfilerStep#") and in_a_step(event):
                    self_us[event.name] += event.self_time
            _collect_conv(root, conv_us, inside_conv=False, counts=in_a_step)
    if not step_ms:
        raise UserError(f"{paths[0]} holds no profiler steps (ProfilerStep#); re-record with train --profile")
    total_us = sum(step_ms) * 1000
    steps_seen = len(step_ms)
    return {
        "files": [str(p) for p in paths],
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


def inspect_run(run_dir: Path) -> dict[str, Any]:
    return {"run_dir": str(run_dir), "workers": {w: analyse_worker(p) for w, p in trace_files(run_dir).items()}}


def print_report(report: dict[str, Any], top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    workers = report["workers"]
    console = Console()
    if not console.is_terminal:
        console = Console(width=100 + 14 * len(workers))
    ranking: dict[str, float] = defaultdict(float)
    for result in workers.values():
        for name, ms in result["self_ms_per_step"].items():
            ranking[name] += ms
    console.print(f"[bold]{report['run_dir']}[/bold]: {len(workers)} trace worker(s)")
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


def run(config: InspectConfig) -> dict[str, Any]:
    if not config.run_dir:
        raise UsageError("pass the profile folder: lenet-dist inspect profiles/<run>")
    report = inspect_run(Path(config.run_dir))
    if config.json == "-":
        print(json.dumps(report, indent=2))
        return report
    print_report(report, config.top)
    if config.json:
        write_json(Path(config.json), report)
        print(f"wrote {config.json}")
    return report
